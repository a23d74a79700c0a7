#!/usr/bin/env bash
# One-command set-up on a fresh Linux machine:
#   bash setup.sh                          # .venv + torch (CUDA build with an NVIDIA GPU, else CPU) + pinned requirements
#   bash setup.sh --data-from DIR          # ... and copy the CS224N data files found in DIR into data/
# Options: --python PY (interpreter for the venv, default python3), --skip-install,
#          --plan (print which torch build would be installed from where, and exit).
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0  # the pin of requirements.txt
CPU_INDEX=https://download.pytorch.org/whl/cpu

PYTHON=python3
DATA_FROM=""
INSTALL=1
PLAN_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data-from) DATA_FROM="${2:?--data-from needs a directory}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --plan) PLAN_ONLY=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# Which torch build, from where.  An NVIDIA GPU (`nvidia-smi -L` lists one): PyPI's default Linux
# wheel, which is the CUDA build (pip's configuration files and find-links are left out of that one
# install, so a local CPU wheel cannot win: it would sort above 2.13.0 as 2.13.0+cpu).
# No GPU: a local torch wheel that pip's find-links configuration points at (pip takes it offline), or
# else the CPU build from PyTorch's CPU index (PyPI's Linux wheel would be the multi-GB CUDA build).
gpu_name() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -m1 '^GPU ' || true; }

local_torch_wheel() {  # the first torch-$TORCH_VERSION wheel in a find-links directory of pip's configuration
  local py="$1" links dir
  links="$("$py" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n') ${PIP_FIND_LINKS:-}"
  for dir in $links; do
    dir="${dir#file://}"
    [ -d "$dir" ] || continue
    for whl in "$dir"/torch-"$TORCH_VERSION"[+-]*.whl; do
      [ -e "$whl" ] && { echo "$whl"; return 0; }
    done
  done
  return 0
}

torch_plan() {  # sets TORCH_PLAN (what), TORCH_ENV (environment of the pip call) and TORCH_CMD (its arguments)
  local py="$1" gpu wheel
  gpu="$(gpu_name)"
  TORCH_ENV=""
  if [ -n "$gpu" ]; then
    TORCH_PLAN="CUDA build of torch $TORCH_VERSION from PyPI (NVIDIA GPU found: ${gpu%% (UUID*})"
    TORCH_ENV="env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null"
    TORCH_CMD="torch==$TORCH_VERSION"
    return
  fi
  wheel="$(local_torch_wheel "$py")"
  if [ -n "$wheel" ]; then
    TORCH_PLAN="CPU build of torch $TORCH_VERSION from the local wheel $wheel (no NVIDIA GPU; pip's find-links)"
    TORCH_CMD="torch==$TORCH_VERSION"
  else
    TORCH_PLAN="CPU build of torch $TORCH_VERSION from $CPU_INDEX (no NVIDIA GPU, no local wheel)"
    TORCH_CMD="torch==$TORCH_VERSION --index-url $CPU_INDEX"
  fi
}

if [ "$PLAN_ONLY" = 1 ]; then
  PY="$PYTHON"; [ -x .venv/bin/python ] && PY=.venv/bin/python
  torch_plan "$PY"
  echo "==> plan: $TORCH_PLAN"
  echo "    ${TORCH_ENV:+$TORCH_ENV }pip install $TORCH_CMD"
  exit 0
fi

if [ "$INSTALL" = 1 ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
  fi
  torch_plan .venv/bin/python
  echo "==> installing the $TORCH_PLAN"
  # shellcheck disable=SC2086  # TORCH_ENV and TORCH_CMD are word lists
  $TORCH_ENV .venv/bin/python -m pip install --quiet --disable-pip-version-check $TORCH_CMD
  echo "==> installing requirements.txt into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -c "import torch, transformers, peft, sacrebleu; print('==> torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)', '| transformers', transformers.__version__, '| CUDA available:', torch.cuda.is_available())"
fi

FILES="ids-sst-train.csv ids-sst-dev.csv ids-sst-test-student.csv
ids-cfimdb-train.csv ids-cfimdb-dev.csv ids-cfimdb-test-student.csv
quora-train.csv quora-dev.csv quora-test-student.csv
sonnets.txt sonnets_held_out.txt sonnets_held_out_dev.txt TRUE_sonnets_held_out_dev.txt"

mkdir -p data predictions
if [ -n "$DATA_FROM" ]; then
  [ -d "$DATA_FROM" ] || { echo "setup.sh: --data-from $DATA_FROM is not a directory" >&2; exit 2; }
  copied=0; missing=""
  for f in $FILES; do
    if [ -f "$DATA_FROM/$f" ]; then cp "$DATA_FROM/$f" data/; copied=$((copied + 1)); else missing="$missing $f"; fi
  done
  echo "==> copied $copied CS224N data files from $DATA_FROM into data/"
  [ -z "$missing" ] || echo "    not found there (scripts that need them will say so):$missing"
else
  echo "==> no --data-from given: put the CS224N 'Build GPT-2' data files (from the course starter's data/"
  echo "    folder) into data/, or re-run with --data-from DIR. See data/README.md for the list."
fi
echo "==> done. Run the tests with: .venv/bin/python -m pytest -q"
