#!/usr/bin/env bash
# Reproduce the paper: every notebook, in order, headless with papermill.
#
#   bash run_all.sh                      # the whole paper on the embedded synthetic data (demo profile)
#   bash run_all.sh --only 09            # the opt-in 3D-context sweep (notebook 09; not in the default run)
#   bash run_all.sh --tests              # set up, then run the test suite
#   bash run_all.sh --lab                # set up, then JupyterLab in notebooks/ (127.0.0.1, with a token)
#   bash run_all.sh --profile paper --data-root /data/CT-RATE    # CT-RATE on all visible GPUs
#   bash run_all.sh --profile paper --data-root /data/CT-RATE \
#       --launcher "srun torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500"
#
# Set-up is automatic: an active virtualenv/conda env that already has ctlib is used as it is;
# otherwise a local .venv is created with the exact versions of requirements-lock.txt (then
# `pip install --no-deps -e .`), or with pyproject.toml's ranges (`pip install -e .[dev,lab]`) given
# --unpinned; again whenever either file changes. Executed notebooks go to runs/<tag>/notebooks/,
# never onto the sources; figures to figures/<tag>/, tables to results/<tag>/ (tag = profile, plus
# -seedN for seeds other than 0).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

PROFILE=demo
DATA_ROOT=""
SEED=0
GPUS=""
LAUNCHER=""
RUNS_AT_ONCE=""
REDO=False
ONLY=""
OUT_ROOT="$HERE"
NB_DIR="$HERE/notebooks"
MODE=paper
CELL_TIMEOUT=86400
PINNED=1
LAB_PORT=""
TORCH_INDEX=""
PRINT_INSTALL=0
LOCK="$HERE/requirements-lock.txt"
OPT_IN=",09,"  # notebooks that run only when --only names them

usage() {
  cat <<'EOF'
Usage: bash run_all.sh [options]

Runs notebooks/01..08 with papermill for one profile and reports what was produced. Notebook 09 (the
3D-context sweep over the lung-nodule cue's strength: 36 training runs at the demo's size, 68 minutes on
2 cores) is opt-in: it runs only when named, e.g. --only 09.

Options:
  --profile NAME    smoke | demo (default) | paper | paper480
  --data-root DIR   a CT-RATE snapshot (folder holding dataset/); default: the synthetic dataset
  --seed N          training seed (default 0); outputs of seed N>0 are tagged <profile>-seedN
  --gpus N          processes per training run (default: all visible GPUs, or 1 on CPU)
  --device D        cuda | cpu | auto: where training runs (default: the profile's, cuda for paper and
                    paper480, which stop at once when torch cannot use a GPU; auto for demo and smoke)
  --launcher CMD    command prefix that starts each training run instead of the default
                    `torchrun --standalone --nproc_per_node=<gpus>`, e.g. on a cluster
                    "srun torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500"
                    (followed by `-m ctlib.train ...`; run folders and caches must be on a shared filesystem;
                    the paper's global batch of 8 is kept on 1 to 8 processes; under Slurm >= 22.05
                    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK first, or srun's tasks get one CPU
                    and the DataLoader workers starve)
  --runs-at-once N  training runs side by side on a CPU-only machine (default: from the cores, two on
                    two cores, one thread each; 1: one after another with all cores)
  --only LIST       run only these notebooks, e.g. --only 01,06 (opt-in notebooks, 09, run only so)
  --out DIR         root for data/, runs/, figures/, results/ (default: this folder)
  --notebooks DIR   the notebooks to run (default: notebooks/)
  --redo            retrain runs whose results already exist (default: reuse them)
  --tests           set up, then run the test suite (tests/) instead of the notebooks
  --lab             set up, then start JupyterLab in the notebooks folder on 127.0.0.1 with a token
                    (installs JupyterLab into the environment when missing; .py and .ipynb open as
                    one paired notebook, saving writes both)
  --port N          JupyterLab's port (default: a free one)
  --unpinned        set up .venv from pyproject.toml's version ranges instead of requirements-lock.txt
  --torch-cuda X.Y  install torch and torchvision built for CUDA X.Y (e.g. 12.6 for NVIDIA drivers
                    525-579; the lock's torch is built for CUDA 13.0 and needs driver >= 580), from
                    https://download.pytorch.org/whl/cuXY, then the rest from requirements-lock.txt;
                    `--torch-cuda cpu` installs the CPU build
  --torch-index URL the same from any package index holding torch (a mirror, a ROCm index)
  --print-install   print the pip commands the set-up would run (with the options above) and stop
  --setup-only      set up the environment and stop
  -h, --help        this help

Environment: CTLIB_PYTHON=/path/to/python uses that interpreter as is (no set-up).
EOF
}

# --torch-cuda X.Y -> PyTorch's index for that build (12.6 -> .../whl/cu126; cpu -> .../whl/cpu)
torch_index_for() {
  local v="$1"
  if [[ "$v" == cpu ]]; then echo "https://download.pytorch.org/whl/cpu"; return; fi
  if [[ ! "$v" =~ ^([0-9]+)\.([0-9])$ ]]; then
    echo "run_all.sh: --torch-cuda takes a CUDA version like 12.6 or 13.0 (or cpu), got '$v'" >&2; return 1
  fi
  echo "https://download.pytorch.org/whl/cu${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2 ;;
    --data-root) DATA_ROOT="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --device) export CTLIB_DEVICE="$2"; shift 2 ;;
    --launcher) LAUNCHER="$2"; shift 2 ;;
    --runs-at-once) RUNS_AT_ONCE="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --out) mkdir -p "$2"; OUT_ROOT="$(cd "$2" && pwd)"; shift 2 ;;
    --notebooks) NB_DIR="$(cd "$2" && pwd)"; shift 2 ;;
    --redo) REDO=True; shift ;;
    --tests) MODE=tests; shift ;;
    --setup-only) MODE=setup; shift ;;
    --lab) MODE=lab; shift ;;
    --port) LAB_PORT="$2"; shift 2 ;;
    --unpinned) PINNED=0; shift ;;
    --torch-cuda) TORCH_INDEX="$(torch_index_for "${2:-}")" || exit 2; shift 2 ;;
    --torch-index) [[ -n "${2:-}" ]] || { echo "run_all.sh: --torch-index needs a URL" >&2; exit 2; }
                   TORCH_INDEX="$2"; shift 2 ;;
    --print-install) PRINT_INSTALL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '[run_all %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
have_ctlib() { "$1" -c 'import ctlib, torch, torchvision, papermill, jupytext, openTSNE, pytest' >/dev/null 2>&1; }
have_lab() { "$1" -c 'import jupyterlab, jupytext' >/dev/null 2>&1; }

# requirements-lock.txt holds exact versions for one platform and Python (its "# platform:" line);
# elsewhere the ranges of pyproject.toml are all we can promise.
lock_usable() {
  local want have
  want="$(sed -n 's/^# platform: //p' "$LOCK" 2>/dev/null)"
  have="$("${LOCK_PY:-$1}" -c 'import platform, sys; print(f"{sys.platform}-{platform.machine()}-py{sys.version_info.major}.{sys.version_info.minor}")')"
  [[ -n "$want" && "$want" == "$have" ]] && return 0
  log "requirements-lock.txt was made on ${want:-?}, this is $have: installing pyproject.toml's ranges instead"
  return 1
}

pip_quiet() {  # PY -m pip ...: quiet, minus the noise of local package mirrors; stops run_all.sh on failure
  if [[ "$PRINT_INSTALL" == 1 ]]; then echo "$*"; return; fi
  "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v -e '^WARNING: Location' -e 'is ignored' || true; }
  local rc="${PIPESTATUS[0]}"
  [[ "$rc" == 0 ]] || { echo "run_all.sh: '${*:2}' failed (exit $rc)" >&2; exit 1; }
}

# The lock's torch family: torch, torchvision, triton and the CUDA libraries that torch's CUDA 13 build pulls in.
TORCH_FAMILY='^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)=='
locked_version() { sed -n "s/^$1==//p" "$LOCK"; }

# install_torch PY: torch and torchvision at the lock's versions from $TORCH_INDEX (their CUDA libraries come
# with them); dependencies already installed at the lock's versions stay as they are
install_torch() {
  local torch_v vision_v
  torch_v="$(locked_version torch)"; vision_v="$(locked_version torchvision)"
  log "installing torch $torch_v and torchvision $vision_v from $TORCH_INDEX"
  pip_quiet "$1" -m pip uninstall -y torch torchvision triton
  pip_quiet "$1" -m pip install "torch==$torch_v" "torchvision==$vision_v" --index-url "$TORCH_INDEX"
}

# install_into PY: ctlib (editable) with the dev and lab extras, at the locked versions when we can; with
# --torch-cuda/--torch-index the lock without its torch family first (--no-deps: the lock is the whole
# closure), then torch from that index, so that only torch and its CUDA libraries come from there
install_into() {
  if [[ "$PINNED" == 1 ]] && lock_usable "$1"; then
    log "installing the exact versions of requirements-lock.txt"
    if [[ -n "$TORCH_INDEX" ]]; then
      local rest="${VENV_DIR:-$HERE/.venv}/requirements-lock-without-torch.txt"
      if [[ "$PRINT_INSTALL" == 1 ]]; then
        echo "grep -vE '$TORCH_FAMILY' $LOCK > $rest"
      else
        grep -vE "$TORCH_FAMILY" "$LOCK" > "$rest"
      fi
      pip_quiet "$1" -m pip install --no-deps -r "$rest"
      install_torch "$1"
    else
      pip_quiet "$1" -m pip install -r "$LOCK"
    fi
    pip_quiet "$1" -m pip install --no-deps -e .
  else
    [[ -z "$TORCH_INDEX" ]] || install_torch "$1"
    pip_quiet "$1" -m pip install -e ".[dev,lab]"
  fi
}

setup_env() {
  if [[ -n "${CTLIB_PYTHON:-}" ]]; then
    PY="$CTLIB_PYTHON"; [[ -z "$TORCH_INDEX" ]] || install_torch "$PY"; return
  fi
  if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]] && command -v python >/dev/null && have_ctlib python; then
    PY="$(command -v python)"; log "using the active environment ($PY)"
    [[ -z "$TORCH_INDEX" ]] || install_torch "$PY"
    return
  fi
  local venv="$HERE/.venv" stamp
  stamp="$(cat pyproject.toml "$LOCK" 2>/dev/null | sha1sum | cut -c1-16)-pinned$PINNED${TORCH_INDEX:+-$TORCH_INDEX}"
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
  install_into "$venv/bin/python"
  have_ctlib "$venv/bin/python" || { echo "run_all.sh: installing ctlib into $venv failed" >&2; exit 1; }
  echo "$stamp" > "$venv/.ctlib-stamp"
  PY="$venv/bin/python"
}

# JupyterLab in notebooks/, in the environment above. jupyter-config/ (on JUPYTER_CONFIG_PATH) makes
# Lab open .py files with jupytext's notebook view by default; notebooks/jupytext.toml pairs them.
start_lab() {
  if ! have_lab "$PY"; then
    if [[ -n "${CTLIB_PYTHON:-}" ]]; then
      echo "run_all.sh: $PY has no JupyterLab; install it there with: $PY -m pip install -e '.[lab]'" >&2
      exit 1
    fi
    log "installing JupyterLab into $("$PY" -c 'import sys; print(sys.prefix)')"
    if [[ "$PINNED" == 1 ]] && lock_usable "$PY"; then
      pip_quiet "$PY" -m pip install -c "$LOCK" -e ".[lab]"
    else
      pip_quiet "$PY" -m pip install -e ".[lab]"
    fi
    have_lab "$PY" || { echo "run_all.sh: installing JupyterLab into $PY failed" >&2; exit 1; }
  fi
  local port="$LAB_PORT" token
  [[ -n "$port" ]] || port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  token="$("$PY" -c 'import secrets; print(secrets.token_hex(24))')"
  log "JupyterLab in $NB_DIR: open http://127.0.0.1:$port/lab?token=$token (Ctrl-C stops it)"
  export JUPYTER_CONFIG_PATH="$HERE/jupyter-config${JUPYTER_CONFIG_PATH:+:$JUPYTER_CONFIG_PATH}"
  export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"  # kernels import this checkout's ctlib
  unset MPLBACKEND  # inline plots in Lab
  local extra=()
  [[ "$(id -u)" != 0 ]] || extra+=(--allow-root)  # containers and CI run as root
  # kernels' ZeroMQ sockets encrypted (CurveZMQ) where jupyter_client supports it (>= 8.10)
  "$PY" -c 'import sys; sys.path.insert(0, "scripts"); import run_notebook as r; sys.exit(r.encrypted_transport_config() is None)' \
    && extra+=(--KernelManager.transport_encryption=auto)
  exec "$PY" -m jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port="$port" \
    --ServerApp.port_retries=0 --IdentityProvider.token="$token" --ServerApp.root_dir="$NB_DIR" \
    "${extra[@]}"
}

if [[ "$PRINT_INSTALL" == 1 ]]; then  # what a fresh set-up of .venv would run, nothing run
  base="$(command -v python3.11 || command -v python3 || true)"
  [[ -n "$base" ]] || { echo "run_all.sh: no python3 found; install Python 3.11" >&2; exit 1; }
  VENV_DIR="$HERE/.venv" LOCK_PY="$base"  # the platform check asks the interpreter the venv would be made from
  echo "$base -m venv $VENV_DIR"
  install_into "$VENV_DIR/bin/python"
  exit 0
fi

setup_env
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

if [[ "$MODE" == setup ]]; then log "environment ready: $PY"; exit 0; fi
if [[ "$MODE" == tests ]]; then
  log "running the test suite with $PY"
  exec "$PY" -m pytest -q tests
fi
if [[ "$MODE" == lab ]]; then start_lab; fi

# --------------------------------------------------------------------------------------------
# the paper
# --------------------------------------------------------------------------------------------
TAG="$("$PY" -c "from ctlib.runs import run_tag; print(run_tag('$PROFILE', $SEED))")"
"$PY" -c "from ctlib.profiles import get_profile; get_profile('$PROFILE')" || exit 2
# A GPU profile on a machine where torch cannot use one stops here, naming the cause and the fix; with a
# cluster --launcher the training processes start elsewhere and check there (python -m ctlib.train).
if [[ -z "$LAUNCHER" ]]; then "$PY" -m ctlib.gpu --profile "$PROFILE" || exit 2; fi
RUNS="$OUT_ROOT/runs"; FIGS="$OUT_ROOT/figures"; RESULTS="$OUT_ROOT/results"; WORK="$OUT_ROOT/data"
EXEC_DIR="$RUNS/$TAG/notebooks"
mkdir -p "$EXEC_DIR"

params=(-p profile "$PROFILE" -p work_dir "$WORK" -p runs_dir "$RUNS" -p figures_dir "$FIGS"
        -p results_dir "$RESULTS" -p seed "$SEED" -p redo "$REDO")
[[ -n "$DATA_ROOT" ]] && params+=(-p data_root "$(cd "$DATA_ROOT" && pwd)")
[[ -n "$GPUS" ]] && params+=(-p gpus "$GPUS")
[[ -n "$LAUNCHER" ]] && params+=(-p launcher "$LAUNCHER")
[[ -n "$RUNS_AT_ONCE" ]] && params+=(-p runs_at_once "$RUNS_AT_ONCE")

declare -a failed=() timings=()
start_all=$SECONDS
shopt -s nullglob
notebooks=("$NB_DIR"/[0-9][0-9]_*.ipynb)
[[ ${#notebooks[@]} -gt 0 ]] || { echo "run_all.sh: no notebooks in $NB_DIR" >&2; exit 1; }
for nb in "${notebooks[@]}"; do
  name="$(basename "$nb" .ipynb)"
  if [[ -n "$ONLY" && ",$ONLY," != *",${name:0:2},"* ]]; then continue; fi
  if [[ -z "$ONLY" && "$OPT_IN" == *",${name:0:2},"* ]]; then continue; fi
  log "=== $name (profile $PROFILE, seed $SEED)"
  t0=$SECONDS
  # papermill's CLI, with the kernel's ZeroMQ transport encrypted where supported (see the script)
  if "$PY" "$HERE/scripts/run_notebook.py" "$nb" "$EXEC_DIR/$name.ipynb" -k python3 --cwd "$NB_DIR" \
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
