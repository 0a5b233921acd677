#!/usr/bin/env bash
# Builds the benchmark peer, Kubeflow's training-operator, from the Go module pinned in
# training-operator/go.mod (cmd/training-operator.v1, CGO off) into
#   $AIDC_CACHE/bin/training-operator-<version>/training-operator
# together with its PyTorchJob CRD, only once per version (a .complete marker; a lock of its own, so
# two clones share one build and the control plane's build never waits on this one). Only the
# benchmarks use it; `make test` never does.
# Progress goes to stderr; the last line on stdout is the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${AIDC_CACHE:-$HOME/.cache/aidc}
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || {
  echo "peer-build: no Go toolchain on PATH; install Go >= 1.26 (https://go.dev/doc/install) and retry" >&2
  exit 1
}
export CGO_ENABLED=0 GOFLAGS=-mod=readonly

log() { echo "peer-build: $*" >&2; }

mod=github.com/kubeflow/training-operator
dir="$here/training-operator"
version=$(cd "$dir" && go list -m -f '{{.Version}}' "$mod")
out="$cache/bin/training-operator-$version"

mkdir -p "$cache/bin"
exec 9>"$cache/bin/.training-operator.lock"
flock 9   # two clones building at once share the result instead of racing

if [ -f "$out/.complete" ]; then
  log "training-operator $version: cached in $out"
else
  log "training-operator $version: building $mod/cmd/training-operator.v1 (first time only; a few minutes on 2 cores)"
  t0=$SECONDS
  rm -rf "$out" && mkdir -p "$out"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$out/training-operator" "$mod/cmd/training-operator.v1") || {
    log "go build failed (see above); check network access to the Go module proxy and disk space"
    exit 1
  }
  src=$(cd "$dir" && go list -m -f '{{.Dir}}' "$mod")
  crd="$src/manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
  [ -f "$crd" ] || { log "no PyTorchJob CRD at $crd"; exit 1; }
  cp "$crd" "$out/kubeflow.org_pytorchjobs.yaml"
  chmod 0644 "$out/kubeflow.org_pytorchjobs.yaml"   # the module cache is read-only
  touch "$out/.complete"
  log "training-operator $version: built in $((SECONDS - t0)) s"
fi
echo "$out"
