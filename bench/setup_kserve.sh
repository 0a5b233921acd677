#!/usr/bin/env bash
# Creates (once) a separate virtualenv with KServe's Python model server for bench/serving.py.
# KServe drags in grpcio, kubernetes, pandas…; it never goes into the project venv.
# torch is not installed again (3 GB of CUDA wheels): a .pth file appends the project venv's
# site-packages *after* KServe's own, so KServe keeps its pinned fastapi/uvicorn and borrows only
# what it lacks (torch and its deps) — both servers run the very same torch build.
# Prints the venv's python path on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${KSERVE_VERSION:-0.21.0}
cache=${AIDC_CACHE:-$HOME/.cache/aidc}
python=${PYTHON:-python3}
venv="$cache/bench-kserve-$version"
mkdir -p "$cache"
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "setup_kserve: creating $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet --progress-bar off "kserve==$version" >&2
  touch "$venv/.complete"
fi
project_site=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
kserve_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$project_site" > "$kserve_site/zz-aidc-project-venv.pth"
"$venv/bin/python" -c 'import kserve, torch' >&2
echo "$venv/bin/python"
