#!/usr/bin/env bash
# `make run` after cluster-up: operator + local kubelet + the end-to-end demo (hack/demo.py).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${1:-$root/.state/cluster}
PYTHONPATH="$root/operator:$root/hack/cluster" exec "$root/.venv/bin/python" "$root/hack/demo.py" "$state"
