#!/usr/bin/env bash
# Reproduce the paper: every notebook, in order, headless with papermill.
#
#   bash run_all.sh                      # the whole paper on the embedded synthetic data (demo profile)
#   bash run_all.sh --tests              # set up, then run the test suite
#   bash run_all.sh --profile paper --data-root /data/CT-RATE    # CT-RATE on all visible GPUs
#
# Set-up is automatic: an active virtualenv/conda env that already has ctlib is used as it is;
# otherwise a local .venv is created and `pip install -e .[dev]` runs (again whenever pyproject.toml
# changes). Executed notebooks go to runs/<tag>/notebooks/, never onto the sources; figures to
# figures/<tag>/, tables to results/<tag>/ (tag = profile, plus -seedN for seeds other than 0).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

PROFILE=demo
DATA_ROOT=""
SEED=0
GPUS=""
REDO=False
ONLY=""
OUT_ROOT="$HERE"
NB_DIR="$HERE/notebooks"
MODE=paper
CELL_TIMEOUT=86400

usage() {
  cat <<'EOF'
Usage: bash run_all.sh [options]

Runs notebooks/01..08 with papermill for one profile and reports what was produced.

Options:
  --profile NAME    smoke | demo (default) | paper | paper480
  --data-root DIR   a CT-RATE snapshot (folder holding dataset/); default: the synthetic dataset
  --seed N          training seed (default 0); outputs of seed N>0 are tagged <profile>-seedN
  --gpus N          processes per training run (default: all visible GPUs, or 1 on CPU)
  --only LIST       run only these notebooks, e.g. --only 01,06
  --out DIR         root for data/, runs/, figures/, results/ (default: this folder)
  --notebooks DIR   the notebooks to run (default: notebooks/)
  --redo            retrain runs whose results already exist (default: reuse them)
  --tests           set up, then run the test suite (tests/) instead of the notebooks
  --setup-only      set up the environment and stop
  -h, --help        this help

Environment: CTLIB_PYTHON=/path/to/python uses that interpreter as is (no set-up).
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2 ;;
    --data-root) DATA_ROOT="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --out) mkdir -p "$2"; OUT_ROOT="$(cd "$2" && pwd)"; shift 2 ;;
    --notebooks) NB_DIR="$(cd "$2" && pwd)"; shift 2 ;;
    --redo) REDO=True; shift ;;
    --tests) MODE=tests; shift ;;
    --setup-only) MODE=setup; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '[run_all %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
have_ctlib() { "$1" -c 'import ctlib, torch, torchvision, papermill, jupytext, openTSNE, pytest' >/dev/null 2>&1; }

setup_env() {
  if [[ -n "${CTLIB_PYTHON:-}" ]]; then PY="$CTLIB_PYTHON"; return; fi
  if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]] && command -v python >/dev/null && have_ctlib python; then
    PY="$(command -v python)"; log "using the active environment ($PY)"; return
  fi
  local venv="$HERE/.venv" stamp
  stamp="$(sha1sum pyproject.toml | cut -c1-16)"
  if [[ -x "$venv/bin/python" && -f "$venv/.ctlib-stamp" && "$(cat "$venv/.ctlib-stamp")" == "$stamp" ]] \
      && have_ctlib "$venv/bin/python"; then
    PY="$venv/bin/python"; return
  fi
  local base
  base="$(command -v python3.11 || command -v python3 || true)"
  [[ -n "$base" ]] || { echo "run_all.sh: no python3 found; install Python 3.11" >&2; exit 1; }
  "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "run_all.sh: $base is older than Python 3.10" >&2; exit 1; }
  log "setting up $venv with $("$base" --version) (a few minutes the first time)"
  [[ -x "$venv/bin/python" ]] || "$base" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'is ignored' || true
  have_ctlib "$venv/bin/python" || { echo "run_all.sh: installing ctlib into $venv failed" >&2; exit 1; }
  echo "$stamp" > "$venv/.ctlib-stamp"
  PY="$venv/bin/python"
}

setup_env
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

if [[ "$MODE" == setup ]]; then log "environment ready: $PY"; exit 0; fi
if [[ "$MODE" == tests ]]; then
  log "running the test suite with $PY"
  exec "$PY" -m pytest -q tests
fi

# --------------------------------------------------------------------------------------------
# the paper
# --------------------------------------------------------------------------------------------
TAG="$("$PY" -c "from ctlib.launch import run_tag; print(run_tag('$PROFILE', $SEED))")"
"$PY" -c "from ctlib.profiles import get_profile; get_profile('$PROFILE')" || exit 2
RUNS="$OUT_ROOT/runs"; FIGS="$OUT_ROOT/figures"; RESULTS="$OUT_ROOT/results"; WORK="$OUT_ROOT/data"
EXEC_DIR="$RUNS/$TAG/notebooks"
mkdir -p "$EXEC_DIR"

params=(-p profile "$PROFILE" -p work_dir "$WORK" -p runs_dir "$RUNS" -p figures_dir "$FIGS"
        -p results_dir "$RESULTS" -p seed "$SEED" -p redo "$REDO")
[[ -n "$DATA_ROOT" ]] && params+=(-p data_root "$(cd "$DATA_ROOT" && pwd)")
[[ -n "$GPUS" ]] && params+=(-p gpus "$GPUS")

declare -a failed=() timings=()
start_all=$SECONDS
shopt -s nullglob
notebooks=("$NB_DIR"/[0-9][0-9]_*.ipynb)
[[ ${#notebooks[@]} -gt 0 ]] || { echo "run_all.sh: no notebooks in $NB_DIR" >&2; exit 1; }
for nb in "${notebooks[@]}"; do
  name="$(basename "$nb" .ipynb)"
  if [[ -n "$ONLY" && ",$ONLY," != *",${name:0:2},"* ]]; then continue; fi
  log "=== $name (profile $PROFILE, seed $SEED)"
  t0=$SECONDS
  if "$PY" -m papermill "$nb" "$EXEC_DIR/$name.ipynb" -k python3 --cwd "$NB_DIR" \
       --log-output --no-progress-bar --execution-timeout "$CELL_TIMEOUT" "${params[@]}"; then
    status=ok
  else
    status=FAILED; failed+=("$name")
  fi
  dt=$((SECONDS - t0))
  timings+=("$(printf '%-28s %-6s %4dm%02ds' "$name" "$status" $((dt / 60)) $((dt % 60)))")
  log "=== $name: $status in $((dt / 60))m$((dt % 60))s"
done

total=$((SECONDS - start_all))
echo
echo "================================ summary ================================"
printf '%s\n' "${timings[@]}"
printf 'total %dm%02ds\n' $((total / 60)) $((total % 60))
echo "executed notebooks: $EXEC_DIR"
if [[ -d "$FIGS/$TAG" ]]; then echo "figures ($FIGS/$TAG):"; ls -1 "$FIGS/$TAG" | sed 's/^/  /'; fi
if [[ -d "$RESULTS/$TAG" ]]; then echo "tables ($RESULTS/$TAG):"; ls -1 "$RESULTS/$TAG" | sed 's/^/  /'; fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED notebooks: ${failed[*]} (see the executed copies in $EXEC_DIR)" >&2
  exit 1
fi
echo "all notebooks ran"
