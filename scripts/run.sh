#!/usr/bin/env bash
# The main job, in one command on a fresh machine: installs the gateway (.venv) and vLLM's CPU build
# (.venv-vllm), builds tiny Qwen3 / DeepSeek / Llama models, starts three vLLM servers, the gateway and
# Prometheus, compares the models on identical prompts, and serves until Ctrl-C (then stops everything).
# Arguments go to `gateway up` (e.g. --port 8080, --no-prometheus, --backends emulated).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-setup.sh
exec .venv/bin/gateway up --backends vllm-cpu "$@"
