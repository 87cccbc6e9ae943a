"""Server-sent events: an incremental framer, and an observer that times token-bearing chunks.

The relay forwards each event's bytes exactly as the backend sent them (no re-serialisation). It needs event
boundaries for two reasons only: to time the chunks that carry tokens, and to drop the usage-only chunk the gateway
asked for on the client's behalf. The framer accepts any of the SSE line endings (LF, CRLF, CR), events split
across reads at any byte, and comment lines.

Definitions (docs/measurement.md): a chunk is *token-bearing* when a choice carries non-empty ``delta.content``,
``delta.reasoning_content``/``delta.reasoning``, ``delta.tool_calls`` or (completions) ``text``. vLLM's first chunk
is role-only (``"content": ""``) and does not count.

Reasoning and answer are told apart: a *reasoning* chunk carries ``reasoning_content`` or ``reasoning`` (what vLLM
streams when started with ``--reasoning-parser``), an *answer* chunk ``content``, ``text`` or ``tool_calls``. A
server started without a parser leaves ``<think>...</think>`` inside the content: the observer counts what is
between the tags as reasoning and flags the call (``think_in_content``). When the ``<think>`` was in the prompt
(DeepSeek-R1's template opens it there), the content starts with thinking and only ``</think>`` shows where it
ended: what came before it is counted again as reasoning, at its own times.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

_BOUNDARY = b"\n\n"
# The fast path of StreamObserver.observe: chunks with usage or an error are parsed, every other one is scanned.
# They run on the event's bytes (no decoding): the keys are ASCII, and UTF-8 never puts an ASCII byte inside a
# multi-byte character.
_SLOW = re.compile(rb'"(?:usage|error)"\s*:\s*[{"\[]|"object"\s*:\s*"error"')
_REASONING = re.compile(rb'"(?:reasoning_content|reasoning)"\s*:\s*"(?!")')
_ANSWER = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([^"\\]+)"')
_DONE = b"data: [DONE]\n\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(slots=True)
class Event:
    raw: bytes  # the event as received, including the blank line that ended it
    data: str | None  # the joined ``data:`` lines, or None for an event with no data (a comment, say)


class SSEFramer:
    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._buf = b""
        self._max = max_event_bytes

    @property
    def pending(self) -> bool:
        """Part of an event has been received and is waiting for the rest."""
        return bool(self._buf)

    def feed(self, chunk: bytes) -> list[Event]:
        return [_parse(raw) for raw in self.feed_raw(chunk)]

    def feed_raw(self, chunk: bytes) -> list[bytes]:
        """The complete events in the bytes received so far, each exactly as received (the relay's path)."""
        buf = self._buf + chunk if self._buf else chunk
        events: list[bytes] = []
        if b"\r" not in buf:  # the common case (vLLM): LF only
            start = 0
            while (end := buf.find(_BOUNDARY, start)) != -1:
                events.append(buf[start : end + 2])
                start = end + 2
            self._buf = buf[start:] if start else buf
        else:
            self._buf = self._feed_general(buf, events)
        if len(self._buf) > self._max:
            raise ValueError(f"an SSE event exceeded {self._max} bytes")
        return events

    def flush(self) -> Event | None:
        """What is left at end of stream: an event the backend never terminated, if any."""
        rest, self._buf = self._buf, b""
        if not rest.strip():
            return None
        return _parse(rest)

    @staticmethod
    def _feed_general(buf: bytes, events: list[bytes]) -> bytes:
        start = pos = 0
        n = len(buf)
        while pos < n:
            nl = _next_line_end(buf, pos)
            if nl is None:
                break
            line_end, after = nl
            if line_end == pos:  # a blank line ends the event
                if pos > start:
                    events.append(buf[start:after])
                start = after
            pos = after
        return buf[start:]


def _next_line_end(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(index where the line's terminator starts, index after it); None if the line is not complete yet."""
    lf = buf.find(b"\n", pos)
    cr = buf.find(b"\r", pos)
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 == len(buf):
        return None  # a CR at the end may be the first half of CRLF: wait for the next read
    return (cr, cr + 2) if buf[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)


def _parse(raw: bytes) -> Event:
    if (
        raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2 and b"\r" not in raw
    ):  # vLLM: one data line
        return Event(raw=raw, data=raw[6:-2].decode("utf-8", "replace"))
    data: list[str] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append((value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace"))
    return Event(raw=raw, data="\n".join(data) if data else None)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_usage(obj: Any) -> Usage | None:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
    )


def cached_tokens_of(obj: Any) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` (prompt tokens served from the prefix cache), when the backend
    reports it (vLLM does with ``--enable-prompt-tokens-details``), or None."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def reasoning_tokens_of(obj: Any) -> int | None:
    """``usage.completion_tokens_details.reasoning_tokens`` (vLLM reports it when started with a reasoning
    parser), or None."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    details = usage.get("completion_tokens_details") if isinstance(usage, dict) else None
    value = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parts(choices: list[Any]) -> tuple[bool, list[str], bool]:
    """(any reasoning, the answer texts, any tool call) of a chunk's choices."""
    reasoning, texts, tools = False, [], False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        if isinstance(text, str) and text:
            texts.append(text)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if delta.get("reasoning_content") or delta.get("reasoning"):
                reasoning = True
            content = delta.get("content")
            if isinstance(content, str) and content:
                texts.append(content)
            if delta.get("tool_calls"):
                tools = True
    return reasoning, texts, tools


def _reasoning_of(choices: list[Any]) -> str:
    parts: list[str] = []
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0 and isinstance(delta := choice.get("delta"), dict):
            text = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


def _add_tool_calls(calls: dict[int, list[str]], choices: list[Any]) -> None:
    """Assemble streamed ``tool_calls`` deltas of the first choice: the name arrives once, the arguments in pieces."""
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0 or not isinstance(choice.get("delta"), dict):
            continue
        for delta in choice["delta"].get("tool_calls") or []:
            if not isinstance(delta, dict):
                continue
            index = delta.get("index", 0)
            slot = calls.setdefault(index if isinstance(index, int) else 0, ["", ""])
            function = delta.get("function")
            if not isinstance(function, dict):
                continue
            if isinstance(function.get("name"), str):
                slot[0] += function["name"]
            if isinstance(function.get("arguments"), str):
                slot[1] += function["arguments"]


def split_answer(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an answer's text that may hold ``<think>...</think>`` (a server without a reasoning
    parser; the opening tag may have been in the prompt)."""
    if THINK_CLOSE not in text:
        if THINK_OPEN in text:  # thinking that never ended (the budget ran out)
            before, thought = text.split(THINK_OPEN, 1)
            return thought, before
        return "", text
    head, answer = text.split(THINK_CLOSE, 1)
    before, _, thought = head.rpartition(THINK_OPEN)
    return thought, before + answer


def _text_of(choices: list[Any]) -> str:
    parts: list[str] = []
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


@dataclass(slots=True)
class StreamObserver:
    """Watches one stream's events; all times are ``time.perf_counter`` seconds relative to nothing in particular.

    ``observe`` returns False for the usage-only chunk so the relay can drop it when the client did not ask.
    """

    t0: float
    keep_text: bool = False
    first_token: float | None = None
    last_token: float | None = None
    gaps: list[float] = field(default_factory=list)
    usage: Usage | None = None
    done: bool = False
    error: dict[str, Any] | None = None
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    reasoning_text: list[str] = field(default_factory=list)  # the first choice's reasoning fields, when kept
    # the first choice's tool calls, when kept: {index: [name, arguments]} assembled from the deltas
    tool_calls: dict[int, list[str]] = field(default_factory=dict)
    token_chunks: int = 0  # chunks that carried tokens (each at least one)
    # Reasoning vs answer (the module docstring): when each began, how many chunks of each, the backend's count.
    first_reasoning: float | None = None
    last_reasoning: float | None = None
    first_answer: float | None = None
    reasoning_chunks: int = 0
    answer_chunks: int = 0
    reasoning_reported: int | None = None  # usage.completion_tokens_details.reasoning_tokens
    cached_reported: int | None = None  # usage.prompt_tokens_details.cached_tokens
    think_in_content: bool = False  # <think> tags were found in the content (a server without a reasoning parser)
    whole_answer: bool = False  # a non-streaming answer had answer content (no times to tell it by)
    whole_reasoning: bool = False  # ... and reasoning
    _in_think: bool = False

    def observe_raw(self, raw: bytes, now: float | None = None) -> bool:
        """``observe`` for an event's bytes, as ``SSEFramer.feed_raw`` gives them (the relay's path)."""
        if self.observe_plain(raw, now):
            return False
        if raw == _DONE:
            self.done = True
            return False
        return self.observe(_parse(raw), now)

    def observe_plain(self, raw: bytes, now: float | None = None) -> bool:
        """Record the event ``raw`` if it is a plain chunk: one ``data:`` line (LF-terminated, then the blank line)
        holding a JSON object with no usage and no error, text not kept. Such a chunk is scanned, not decoded or
        parsed; keys can be matched literally because a quote inside a JSON string is always escaped. False
        (nothing recorded) for anything else, including bytes that are not exactly one event."""
        if (
            self.keep_text
            or not raw.startswith(b"data: {")
            or not raw.endswith(b"\n\n")
            or raw.count(b"\n") != 2
            or b"\r" in raw
            or _SLOW.search(raw) is not None
        ):
            return False
        answer = _ANSWER.search(raw) is not None
        if answer and (self._in_think or b"think>" in raw):
            return False  # thinking tags inside the content: parsed (``observe``)
        # most chunks carry no reasoning key at all: a substring test spares them the second scan
        reasoning = b'"reasoning' in raw and _REASONING.search(raw) is not None
        if answer or reasoning:
            self._token(time.perf_counter() if now is None else now, reasoning, answer)
        if (finish := _FINISH.search(raw)) is not None:
            self.finish_reason = finish.group(1).decode("utf-8", "replace")
        return True

    def observe(self, event: Event, now: float | None = None) -> bool:
        """Record one event. Returns True if it is the usage-only chunk (choices empty, usage present)."""
        data = event.data
        if data is None:
            return False
        if data == "[DONE]":
            self.done = True
            return False
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        return self.observe_obj(obj, now)

    def observe_obj(self, obj: Any, now: float | None = None) -> bool:
        """``observe`` for an event's data already parsed (callers that need the object too parse it once)."""
        if not isinstance(obj, dict):
            return False
        if "error" in obj or obj.get("object") == "error":
            err = obj.get("error", obj)
            self.error = err if isinstance(err, dict) else {"message": str(err)}
            return False
        usage = read_usage(obj)
        if usage is not None:
            self.usage = usage
            self.reasoning_reported = reasoning_tokens_of(obj)
            self.cached_reported = cached_tokens_of(obj)
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return usage is not None
        reasoning, texts, tools = _parts(choices)
        answer = tools
        for text in texts:
            thought, said = self._split_think(text)
            reasoning, answer = reasoning or thought, answer or said
        if reasoning or answer:
            self._token(time.perf_counter() if now is None else now, reasoning, answer)
            if self.keep_text:
                self.text.append(_text_of(choices))
                self.reasoning_text.append(_reasoning_of(choices))
                if tools:
                    _add_tool_calls(self.tool_calls, choices)
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return False

    def observe_answer(self, obj: Any) -> None:
        """A non-streaming answer (one JSON body): its usage, its finish reason, whether it reasoned and answered
        and, when kept, its text (the first choice's message, or a completion's text). No token times: a whole body
        has no first token."""
        if not isinstance(obj, dict):
            return
        self.usage = read_usage(obj)
        self.reasoning_reported = reasoning_tokens_of(obj)
        self.cached_reported = cached_tokens_of(obj)
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            said = bool(isinstance(message, dict) and message.get("tool_calls"))
            thought = bool(isinstance(message, dict) and (message.get("reasoning_content") or message.get("reasoning")))
            if isinstance(text, str) and text:
                in_tags, outside = self._split_think(text)
                thought, said = thought or in_tags, said or outside
            self.whole_answer = said
            self.whole_reasoning = thought
            if self.keep_text and isinstance(text, str):
                self.text.append(text)
            if self.keep_text and isinstance(message, dict):
                for i, call in enumerate(message.get("tool_calls") or []):
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        name, arguments = function.get("name"), function.get("arguments")
                        self.tool_calls[i] = [name if isinstance(name, str) else "",
                                              arguments if isinstance(arguments, str) else ""]  # fmt: skip
                thinking = message.get("reasoning_content") or message.get("reasoning")
                if isinstance(thinking, str):
                    self.reasoning_text.append(thinking)

    def _split_think(self, text: str) -> tuple[bool, bool]:
        """(carries reasoning, carries answer) for one piece of content, following ``<think>`` tags across chunks."""
        if self._in_think:
            if THINK_CLOSE not in text:
                return True, False
            self._in_think = False
            return True, bool(text.split(THINK_CLOSE, 1)[1])
        if THINK_OPEN in text and self.first_answer is None:
            self.think_in_content = True
            before, rest = text.split(THINK_OPEN, 1)
            if THINK_CLOSE in rest:
                return True, bool(before) or bool(rest.split(THINK_CLOSE, 1)[1])
            self._in_think = True
            return True, bool(before)
        if THINK_CLOSE in text and not self.think_in_content and self.reasoning_chunks == 0:
            # The <think> was in the prompt: the answer so far was thinking.
            self.think_in_content = True
            if self.first_answer is not None:
                self.first_reasoning, self.last_reasoning = self.first_answer, self.last_token
                self.reasoning_chunks, self.answer_chunks, self.first_answer = self.answer_chunks, 0, None
            return True, bool(text.split(THINK_CLOSE, 1)[1])
        return False, True

    def _token(self, t: float, reasoning: bool = False, answer: bool = True) -> None:
        self.token_chunks += 1
        if self.first_token is None:
            self.first_token = t
        elif self.last_token is not None:
            self.gaps.append(t - self.last_token)
        self.last_token = t
        if reasoning:
            self.reasoning_chunks += 1
            self.last_reasoning = t
            if self.first_reasoning is None:
                self.first_reasoning = t
        if answer:
            self.answer_chunks += 1
            if self.first_answer is None:
                self.first_answer = t

    @property
    def ttfat(self) -> float | None:
        """Time to first answer token: the first chunk with answer content (or text, or a tool call)."""
        return None if self.first_answer is None else self.first_answer - self.t0

    @property
    def reasoning_s(self) -> float | None:
        """Thinking time: from the first reasoning chunk to the first answer chunk (to the last reasoning chunk
        when no answer came); None for a call that did not think."""
        if self.first_reasoning is None:
            return None
        end = self.first_answer if self.first_answer is not None else self.last_reasoning
        return None if end is None else max(0.0, end - self.first_reasoning)

    @property
    def reasoning_tokens(self) -> int:
        """The backend's count when it reported one, else the reasoning chunks (``reasoning_counted``)."""
        return self.reasoning_reported if self.reasoning_reported is not None else self.reasoning_chunks

    @property
    def reasoning_counted(self) -> bool:
        """True when ``reasoning_tokens`` was counted from chunks, not reported by the backend."""
        return self.reasoning_reported is None

    def answer_tokens(self, completion_tokens: int) -> int:
        """Completion tokens that were not reasoning (the answer chunks when the split was not reported)."""
        if self.reasoning_reported is not None:
            return max(0, completion_tokens - self.reasoning_reported)
        if self.reasoning_chunks == 0:
            return completion_tokens
        return max(0, completion_tokens - self.reasoning_chunks) if completion_tokens else self.answer_chunks

    @property
    def empty_answer(self) -> bool:
        """The call produced no answer at all (e.g. the thinking used the whole ``max_tokens``)."""
        return self.first_answer is None and not self.whole_answer

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.t0

    @property
    def e2e(self) -> float | None:
        return None if self.last_token is None else self.last_token - self.t0

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.last_token is None or self.usage is None:
            return None
        n = self.usage.completion_tokens
        return (self.last_token - self.first_token) / (n - 1) if n > 1 else None
