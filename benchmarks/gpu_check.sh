#!/usr/bin/env bash
# One GPU check, ready to run on a machine with a GPU and nothing prepared (under 8 minutes on one GPU):
# environment, training speed and peak memory of each model at the paper's sizes (eager and compiled),
# a paper-profile fusion run timed through generation, preparation, training and evaluation, and a
# two-process NCCL check when more than one GPU is visible. Writes report.json and report.md.
#
#   bash benchmarks/gpu_check.sh                          # -> gpu_check/report.md
#   bash benchmarks/gpu_check.sh --out /tmp/gpu_check
#   bash benchmarks/gpu_check.sh --device cpu --quick     # on a CPU at small sizes: proves it end to end
#
# Python: $CTLIB_PYTHON, else the active environment's python3 (needs ctlib's dependencies).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${CTLIB_PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
cd "$HERE"
exec "$PY" "$HERE/benchmarks/gpu_check.py" "$@"
