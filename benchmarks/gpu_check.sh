#!/usr/bin/env bash
# The GPU check: does the training loop reach the speed target on this machine's GPUs? Within 8 minutes,
# each section with its own time budget: environment (torch, CUDA, driver, GPUs), model FLOPs, a small
# prepared cache at the paper profile, then per model the real loop (ctlib.train.train_epoch: DataLoader
# workers, pinned memory, DDP over every visible GPU, the global batch of 8, fused AdamW, bf16, eager) for 5
# warm-up and 50 timed steps: volumes/s, peak memory per GPU against the estimate, DataLoader wait, GPU
# utilisation, MFU; a two-process NCCL all-reduce with more than one GPU. The verdict names the GPU and its
# target (fusion >= 40 volumes/s on one H100, >= 45 on one H200). Without a GPU torch can use it stops at
# once with the cause and the fix. Writes report.json and report.md.
#
#   bash benchmarks/gpu_check.sh                          # -> gpu_check/report.md
#   bash benchmarks/gpu_check.sh --out /tmp/gpu_check --compile   # + the fusion under torch.compile (~4 min)
#   bash benchmarks/gpu_check.sh --device cpu --quick     # on a CPU at smoke sizes: proves it end to end
#
# Python: $CTLIB_PYTHON, else the active environment's python3 (needs ctlib's dependencies).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CTLIB_PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
cd "$HERE"
exec "$PY" "$HERE/benchmarks/gpu_check.py" "$@"
