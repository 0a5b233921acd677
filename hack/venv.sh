#!/usr/bin/env bash
# Creates (once) the project's virtualenv and links it to ./.venv.
# The env lives in ~/.cache/aidc keyed by the hash of hack/requirements.txt and the Python version,
# so a fresh clone on the same machine reuses it (torch alone is ~3 GB with its CUDA wheels).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${AIDC_CACHE:-$HOME/.cache/aidc}
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "venv: $python not found; install Python >= 3.11" >&2; exit 1; }
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$( (cat "$root/hack/requirements.txt"; echo "$pyver") | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
mkdir -p "$cache"
# One builder at a time: parallel make targets (or two clones) wait here instead of clobbering.
exec 9>"$cache/venv-$key.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "venv: creating $venv (first time: downloads torch and friends, several minutes)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --upgrade --quiet pip
  # pip prints one line per package it collects: progress without a 3 GB progress bar per wheel.
  "$venv/bin/pip" install --progress-bar off -r "$root/hack/requirements.txt" | grep -E '^(Collecting|Successfully)' || true
  "$venv/bin/python" -c 'import kopf, kubernetes, torch, fastapi, cryptography' \
    || { echo "venv: install did not complete; rerun 'make venv'" >&2; exit 1; }
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$root/.venv"
echo "venv: ready at .venv -> $venv"
