#!/usr/bin/env bash
# One-time, idempotent set-up of the project's virtual environment (.venv).
# torch is installed first from the pinned CPU wheel: a bare `torch` requirement would pull a
# multi-GB CUDA build. Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP=$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$STAMP" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
# Hugging Face's `kernels` distribution imports as `kernels`, the name of this repository's kernel package:
# transformers finds its metadata, imports ours and fails. transformers < 5.25 does not need it; drop one left over.
if "$VENV/bin/python" -m pip show --quiet kernels >/dev/null 2>&1; then
  echo "set-up: removing the 'kernels' distribution (its import name collides with this repository's kernels/)"
  "$VENV/bin/python" -m pip uninstall --quiet --yes kernels
fi
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "set-up done: $VENV"
