#!/usr/bin/env bash
# Set up (idempotent, with the real model: tests/test_real_model.py needs it) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --real
exec .venv/bin/python -m pytest "$@"
