#!/usr/bin/env bash
# Installs the held-out clients (docs/heldout-clients.md) each into a virtualenv of its own under .venv-clients/,
# pinned, so that their dependencies never meet the gateway's:
#   guidellm   GuideLLM (needs torch: the CPU build is installed first, else pip would pull a CUDA one)
#   aiperf     NVIDIA's AIPerf
#   langchain  langchain-openai (ChatOpenAI's with_structured_output and bind_tools)
#   lm-eval    EleutherAI's lm-evaluation-harness with its API extra and transformers for the tokenizer (its
#              local-completions model needs no torch)
#
# Usage: scripts/heldout-setup.sh [CLIENT...]      (default: all four)
#
# Idempotent: each venv has a stamp file holding what was installed; when it matches the pins below, that client
# is skipped at once. Change a pin and the next run reinstalls that client.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN=${PYTHON_BIN:-python3.11} # torch's local CPU wheel is built for CPython 3.11
TORCH=torch==2.13.0
declare -A PINS=(
  [guidellm]="$TORCH guidellm==0.8.1"
  [aiperf]="aiperf==0.13.0"
  [langchain]="langchain-openai==1.7.4 langchain-core==1.8.1"
  [lm-eval]="lm-eval[api]==0.4.13 transformers==5.24.0"
)
STAMP_VERSION=1 # bump when the steps below change

clients=("$@")
[ ${#clients[@]} -gt 0 ] || clients=(guidellm aiperf langchain lm-eval)

for client in "${clients[@]}"; do
  specs=${PINS[$client]:-}
  [ -n "$specs" ] || { echo "error: unknown client '$client' (known: ${!PINS[*]})" >&2; exit 2; }
  venv=.venv-clients/$client
  want="$specs stamp=$STAMP_VERSION"
  if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    continue
  fi
  echo "==> held-out client $client: $specs"
  rm -rf "$venv"
  "$PYTHON_BIN" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  read -r -a args <<<"$specs"
  if [ "${args[0]}" = "$TORCH" ]; then
    # torch alone first: resolved together with the client, a plain `torch` requirement may pick a CUDA build.
    "$venv/bin/python" -m pip install --quiet "$TORCH"
  fi
  "$venv/bin/python" -m pip install --quiet "${args[@]}"
  echo "$want" >"$venv/.installed"
done
