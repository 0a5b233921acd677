#!/usr/bin/env bash
# Every GPU check the project owes, as one short run for a lent GPU machine (the `device` tool):
# NCCL training and resume through torchrun, GPU energy (trainer and server), FSDP on CUDA (and its sharded DCP
# checkpoints, resumed on fewer GPUs), the trainer-overhead benchmark (in one
# process, then across torchrun processes) and the checkpoint-stall benchmark. It uses the machine's
# python3 (torch with CUDA, cryptography, prometheus-client, numpy), not the project venv, which is
# too large to carry. Each step has its own time limit so one hang cannot spend the whole lease;
# logs go to ${OUT:-/tmp}/device-checks/. Also runs on a machine without a GPU (gloo, CPU), which
# is how it is tested before a lease.
#
#     bash bench/device_checks.sh            # ~6 minutes on one H200
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}/device-checks
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 AIDC_METRICS_PORT=-1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() {  # name, seconds, command...: run it, keep its log, show its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-8}" "$out/$name.log"
  echo "== $name: exit $rc"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
gpus=$("$py" -c 'import torch; print(max(torch.cuda.device_count(), 1))')

mkdir "$work/keys"
head -c 32 /dev/urandom >"$work/keys/key-g1"
printf g1 >"$work/keys/current-key-id"
run=("$py" -m torch.distributed.run --standalone "--nproc-per-node=$gpus" -m aidc_trainer --eval-every 100)
ck=(--checkpoint-dir "$work/ck" --checkpoint-every-steps 100 --key-dir "$work/keys")

# NCCL (gloo without a GPU): DDP over every GPU, bf16, encrypted checkpoints; then a second gang
# resumes from step 300. With two or more GPUs this is the first NCCL run of the async control sync.
step ddp-bf16 120 "${run[@]}" --steps 300 --precision bf16 "${ck[@]}"
step ddp-resume 90 "${run[@]}" --steps 400 --precision bf16 "${ck[@]}"
grep -h '"event": "resume"' "$out/ddp-resume.log" | head -n 1
# Issue 17's energy: the job's NVML energy summed over every GPU of every rank (energy_source "nvml"
# and a positive energy_joules in the done event; "unavailable: ..." says why not), beside the
# driver's own counter; then the server's meter over the same GPUs while a matmul loop runs.
grep -h '"event": "done"' "$out/ddp-bf16.log" | head -n 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,total_energy_consumption --format=csv,noheader
step server-energy 60 env PYTHONPATH="$PWD/server:$PYTHONPATH" "$py" -c '
import time, torch
from aidc_server.energy import EnergyMeter
meter = EnergyMeter()
x = torch.randn(4096, 4096, device="cuda" if torch.cuda.is_available() else "cpu")
end = time.monotonic() + 10
while time.monotonic() < end:
    x = (x @ x).tanh()
meter.sample()
print("server energy over 10 s of matmuls:", meter.reading())'
step fsdp 90 "${run[@]}" --steps 200 --parallel fsdp --checkpoint-dir "$work/fsdp" --checkpoint-every-steps 100
# Issue 15: FSDP checkpoints as encrypted DCP shards over NCCL (each rank writes its own shards,
# async), then a resume on one GPU fewer where there are several (DCP reshards N -> M).
dcp=(--parallel fsdp --checkpoint-dir "$work/fsdp-dcp" --checkpoint-every-steps 100 --key-dir "$work/keys")
step fsdp-dcp 90 "${run[@]}" --steps 200 "${dcp[@]}"
fewer=("$py" -m torch.distributed.run --standalone "--nproc-per-node=$((gpus > 1 ? gpus - 1 : 1))" -m aidc_trainer --eval-every 100)
step fsdp-dcp-resume 90 "${fewer[@]}" --steps 300 "${dcp[@]}"
grep -h '"event": "resume"' "$out/fsdp-dcp-resume.log" | head -n 1
"$py" -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["format"], m["layout"], "world", m["world_size"], sorted(m["files"]))' \
  "$work/fsdp-dcp/step-000000300/manifest.json"

# Issue 4's open goal: aidc vs a plain DDP loop, <= 2 % with checkpointing off.
TAIL=3 step overhead-in-process 150 "$py" bench/trainer_overhead.py --in-process --steps 2000 --reps 10
TAIL=7 step overhead-torchrun 180 "$py" bench/trainer_overhead.py --nproc 1 --steps 2000 --reps 3
TAIL=12 step checkpoint 120 "$py" bench/checkpoint.py --params-m 250 --reps 3 --crypto-mb 1024

# Issue 16's CUDA inference: the transformer served by the server's own model and batcher code on the
# GPU (fp32, bf16; pinned batch buffers) against the CPU path; prints rows/s, exits 1 on a mismatch.
TAIL=5 step serving-gpu 120 env PYTHONPATH="$PWD/server:$PYTHONPATH" "$py" bench/serving_gpu.py --requests 512
