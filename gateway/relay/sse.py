"""Server-sent events: an incremental framer, and an observer that times token-bearing chunks.

The relay forwards each event's bytes exactly as the backend sent them (no re-serialisation). It needs event
boundaries for two reasons only: to time the chunks that carry tokens, and to drop the usage-only chunk the gateway
asked for on the client's behalf. The framer accepts any of the SSE line endings (LF, CRLF, CR), events split
across reads at any byte, and comment lines.

Definitions (docs/measurement.md): a chunk is *token-bearing* when a choice carries non-empty ``delta.content``,
``delta.reasoning_content``/``delta.reasoning``, ``delta.tool_calls`` or (completions) ``text``. vLLM's first chunk
is role-only (``"content": ""``) and does not count.
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
_TOKEN = re.compile(rb'"(?:content|reasoning_content|reasoning|text)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([^"\\]+)"')
_DONE = b"data: [DONE]\n\n"


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


def _carries_tokens(choices: list[Any]) -> bool:
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
            or delta.get("tool_calls")
        ):  # fmt: skip
            return True
    return False


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
    token_chunks: int = 0  # chunks that carried tokens (each at least one)

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
        if _TOKEN.search(raw) is not None:
            self._token(time.perf_counter() if now is None else now)
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
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return usage is not None
        if _carries_tokens(choices):
            self._token(time.perf_counter() if now is None else now)
            if self.keep_text:
                self.text.append(_text_of(choices))
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return False

    def observe_answer(self, obj: Any) -> None:
        """A non-streaming answer (one JSON body): its usage, its finish reason and, when kept, its text (the first
        choice's message, or a completion's text). No token times: a whole body has no first token."""
        if not isinstance(obj, dict):
            return
        self.usage = read_usage(obj)
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if self.keep_text and isinstance(text, str):
                self.text.append(text)

    def _token(self, t: float) -> None:
        self.token_chunks += 1
        if self.first_token is None:
            self.first_token = t
        elif self.last_token is not None:
            self.gaps.append(t - self.last_token)
        self.last_token = t

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
