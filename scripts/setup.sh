#!/usr/bin/env bash
# Idempotent setup: creates .venv at the repo root and installs the package with its
# dependencies. torch is pinned to 2.13.0 first so pip takes the local CPU wheel rather
# than resolving a multi-GB CUDA build from a bare "torch" requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
