"""The emulator's settings and the limits it shares with vLLM 0.32's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EMULATOR = "vllm-emulator"
MAX_LOGPROBS = 20  # vLLM's --max-logprobs default
MAX_N = 16384  # VLLM_MAX_N_SEQUENCES
MAX_STOP_STRINGS = 4  # VLLM_MAX_STOP_STRINGS
MAX_PROMPTS = 1024  # VLLM_MAX_COMPLETION_PROMPTS


@dataclass(slots=True)
class EmulatorConfig:
    model: str
    ttft_ms: float = 200.0
    itl_ms: float = 20.0
    output_tokens: int = 64
    jitter: float = 0.0  # each delay is multiplied by a factor drawn uniformly from [1 - jitter, 1 + jitter]
    seed: int = 0
    batch_size: int = 64
    max_model_len: int = 4096
    fail_rate: float = 0.0  # fraction of requests answered with a 500 before any byte
    stream_error_rate: float = 0.0  # fraction of streams that send an error event half-way
    drop_rate: float = 0.0  # fraction of streams cut off half-way, without [DONE]
    tokenizer: str | None = None  # a Hugging Face tokenizer directory (tokenizer.json); None: tokens are words
    tokenizer_info: bool = False  # serve GET /tokenizer_info, as vLLM does with --enable-tokenizer-info-endpoint
    # Thinking (chat only): this many reasoning tokens before each answer. By default as vLLM started with a
    # --reasoning-parser streams them (in ``reasoning_field``, counted in completion_tokens_details); with
    # ``think_in_content`` as a server without a parser does: inside the content, between <think> tags.
    reasoning_tokens: int = 0
    reasoning_field: Literal["reasoning", "reasoning_content"] = "reasoning"  # vLLM 0.32's name; older: _content
    think_in_content: bool = False
    # The oracle (``oracle``): a graded prompt file whose prompts are answered right with probability ``accuracy``
    # (decided by ``seed`` and the prompt); ``tool_error_rate``: the share of wrong tool answers that are invalid calls.
    answers: str | None = None
    accuracy: float = 1.0
    tool_error_rate: float = 0.5

    def __post_init__(self) -> None:
        for name in ("accuracy", "tool_error_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.reasoning_tokens < 0:
            raise ValueError(f"reasoning_tokens must be at least 0, got {self.reasoning_tokens}")
        if self.reasoning_field not in ("reasoning", "reasoning_content"):
            raise ValueError(f"reasoning_field must be reasoning or reasoning_content, got {self.reasoning_field!r}")

    @property
    def reasoning_parser(self) -> bool:
        """Whether the emulated server runs a reasoning parser (vLLM's --reasoning-parser): reasoning in its own
        field, and ``completion_tokens_details`` in every chat usage."""
        return self.reasoning_tokens > 0 and not self.think_in_content
