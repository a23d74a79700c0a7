#!/usr/bin/env bash
# One-command set-up on a fresh Linux machine:
#   bash setup.sh                          # .venv + pinned requirements
#   bash setup.sh --data-from DIR          # ... and copy the CS224N data files found in DIR into data/
# Options: --python PY (interpreter for the venv, default python3), --skip-install.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=python3
DATA_FROM=""
INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --data-from) DATA_FROM="${2:?--data-from needs a directory}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$INSTALL" = 1 ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
  fi
  echo "==> installing requirements.txt into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -c "import torch, transformers, peft, sacrebleu; print('==> torch', torch.__version__, '| transformers', transformers.__version__, '| CUDA available:', torch.cuda.is_available())"
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
