"""A vLLM emulator: vLLM's OpenAI API with configurable timing and failures, and no model at all.

It is the test double and the fast backend for load and overhead tests. It is always labelled as what it is:
``owned_by: "vllm-emulator"`` in ``/v1/models``, an ``x-emulator`` header on every response, and its text is
filler words, not the output of any model. Tokens are word pieces by default, or a Hugging Face tokenizer's real
tokens with ``--tokenizer DIR`` (``tokens``).

Every request field is honoured in vLLM 0.32's response shape, accepted as a no-op, or refused with vLLM's 400
body (``params`` lists which); unknown fields are ignored as vLLM ignores them. Shapes follow vLLM's OpenAI server:
a role-only first chunk per choice, one chunk per token and choice (``n`` choices interleaved per step), the finish
reason on each choice's last token chunk, the usage-only chunk (``"choices": []``) when
``stream_options.include_usage`` is true, then ``data: [DONE]``; errors as ``{"error": {message, type, param,
code}}``; ``/tokenize``, ``/detokenize`` and (with ``tokenizer_info``) ``/tokenizer_info``; ``/metrics`` with vLLM's
own metric names.

Thinking (``--reasoning-tokens N``, chat only): N reasoning chunks before each answer, in vLLM's ``reasoning`` (or
``reasoning_content``) delta field as with a reasoning parser, or inside the content between ``<think>`` tags as
without one (``generate`` and ``render`` tell the shapes).

The oracle (``--answers FILE.jsonl --accuracy P``): a graded prompt file's prompts answered right with a known
probability, decided per prompt by the seed (``oracle``); other prompts get filler as usual.

Timing: TTFT and ITL are scheduled against the request's start (no drift), scaled by a simple load model
(``running / batch_size`` once more requests run than fit in a batch), with optional seeded jitter.

Modules: ``config`` (settings, limits), ``errors`` (vLLM's error bodies), ``params`` (the field policy), ``tokens``
(token models), ``generate`` (what each choice says), ``tools`` (schema-valid values), ``logprobs``, ``oracle``
(known answers to graded prompts), ``render`` (answer shapes), ``tokenize`` (tokenizer routes), ``metrics`` (engine
metrics), ``app`` (routes, timing, faults).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.devstack.emulator.app import Emulator as Emulator
    from gateway.devstack.emulator.app import create_emulator_app as create_emulator_app
    from gateway.devstack.emulator.config import EMULATOR as EMULATOR
    from gateway.devstack.emulator.config import EmulatorConfig as EmulatorConfig
    from gateway.devstack.emulator.errors import VllmError as VllmError
    from gateway.devstack.emulator.metrics import EngineMetrics as EngineMetrics
    from gateway.devstack.emulator.tokens import WORDS as WORDS

# The public names, loaded on first use (PEP 562): a package's __init__ is loaded with each of its modules, so
# importing them here at load time would make every module import itself (tests/test_layout.py forbids cycles).
EXPORTS = {
    "Emulator": "app",
    "create_emulator_app": "app",
    "EMULATOR": "config",
    "EmulatorConfig": "config",
    "VllmError": "errors",
    "EngineMetrics": "metrics",
    "WORDS": "tokens",
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{EXPORTS[name]}"), name)
