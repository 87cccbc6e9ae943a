"""The soak (loadtests/soak.py): its verdicts on hand-made streams, its client path against fake servers that
truncate or fake the end of a stream, a short real soak through the gateway, the same traffic straight at a
dropping emulator (which must be reported LOST), and Ctrl-C leaving no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.soak import (
    COMPLETE,
    DISCONNECT,
    ERROR,
    LOST,
    REJECTED,
    Expect,
    FanoutStreamCheck,
    StreamCheck,
    Traffic,
    Verdict,
    check_completion,
    check_error_status,
    check_fanout,
    sse_data,
)
from tests.servers import REPO

pytestmark = pytest.mark.slow  # left out of scripts/test.sh --quick

ERR = '{"error": {"message": "boom", "type": "InternalServerError", "param": null, "code": 500}}'


def chunk(text: str | None = "x", finish: str | None = None, chat: bool = True) -> str:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    return json.dumps({"id": "c", "choices": [choice]})


USAGE = json.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
ROLE = json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
THREE = [ROLE, chunk(), chunk(), chunk(finish="length")]


@pytest.mark.parametrize(
    ("events", "want_usage", "transport_error", "outcome", "detail"),
    [
        ([*THREE, "[DONE]"], False, None, COMPLETE, ""),
        ([*THREE, USAGE, "[DONE]"], True, None, COMPLETE, ""),
        ([ROLE, chunk(), ERR, "[DONE]"], False, None, ERROR, "stream InternalServerError"),
        # what a gateway that passed a cut-off stream through silently would send
        ([ROLE, chunk(), chunk()], False, None, LOST, "without [DONE]"),
        ([*THREE], False, None, LOST, "without [DONE]"),
        # a fake end: [DONE] where the backend broke off
        ([ROLE, chunk(), "[DONE]"], False, None, LOST, "fake end"),
        ([ROLE, chunk(), chunk(finish="length"), "[DONE]"], False, None, LOST, "2 token chunks, expected 3"),
        ([ROLE, chunk(), ERR], False, None, LOST, "without [DONE]"),
        ([ROLE, chunk(), ERR, chunk(), "[DONE]"], False, None, LOST, "after the error event"),
        ([*THREE, "[DONE]", "[DONE]"], False, None, LOST, "after [DONE]"),
        ([*THREE, "[DONE]"], True, None, LOST, "0 usage chunks"),
        ([*THREE, USAGE, "[DONE]"], False, None, LOST, "did not ask"),
        ([*THREE, "not json", "[DONE]"], False, None, LOST, "not JSON"),
        ([ROLE, chunk()], False, "RemoteProtocolError: peer closed", LOST, "peer closed"),
        ([ROLE, '{"error": "plain string"}', "[DONE]"], False, None, LOST, "not an OpenAI error object"),
    ],
)
def test_stream_verdicts(
    events: list[str], want_usage: bool, transport_error: str | None, outcome: str, detail: str
) -> None:
    check = StreamCheck(Expect(3, "length"), want_usage)
    for data in events:
        check.feed(data)
    verdict = check.verdict(transport_error)
    assert verdict.outcome == outcome, verdict
    assert detail in verdict.detail


@pytest.mark.parametrize(
    ("status", "raw", "bad_request", "outcome"),
    [
        (500, ERR.encode(), False, ERROR),
        (502, b"<html>Bad Gateway</html>", False, LOST),
        (503, b'{"detail": "not an OpenAI error"}', False, LOST),
        (404, b'{"error": {"message": "no such model", "type": "not_found_error"}}', True, REJECTED),
        (503, ERR.encode(), True, ERROR),  # the backend that would have refused it was down: still explicit
        (200, ERR.encode(), True, LOST),
    ],
)
def test_error_status_verdicts(status: int, raw: bytes, bad_request: bool, outcome: str) -> None:
    assert check_error_status(status, raw, bad_request=bad_request).outcome == outcome


def test_completion_and_fanout_verdicts() -> None:
    good = {"choices": [{"message": {"content": "a b"}, "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}
    assert check_completion(json.dumps(good).encode(), Expect(2, "stop")).outcome == COMPLETE
    assert check_completion(json.dumps(good).encode(), Expect(3, "stop")).outcome == LOST
    assert check_completion(b'{"choices": []}', Expect()).outcome == LOST
    ok = {"model": "a", "response": good, "error": None}
    failed = {"model": "b", "response": None, "error": {"message": "boom", "code": 500}}
    silent = {"model": "b", "response": None, "error": None}
    assert check_fanout(json.dumps({"results": [ok]}).encode(), ["a"], Expect(2, "stop")).outcome == COMPLETE
    assert check_fanout(json.dumps({"results": [ok, failed]}).encode(), ["a", "b"], Expect(2)).outcome == ERROR
    assert check_fanout(json.dumps({"results": [ok, silent]}).encode(), ["a", "b"], Expect(2)).outcome == LOST
    assert check_fanout(json.dumps({"results": [ok]}).encode(), ["a", "b"], Expect(2)).outcome == LOST

    def fanout(*events: dict[str, Any]) -> Verdict:
        check = FanoutStreamCheck(["a"], Expect(1, "length"))
        for e in events:
            check.feed(json.dumps(e))
        check.feed("[DONE]")
        return check.verdict()

    tagged = {"model": "a", "type": "chunk", "chunk": json.loads(chunk(finish="length"))}
    result = {"model": "a", "type": "result", "error": None}
    assert fanout(tagged, result, {"type": "done", "id": "cmp-1"}).outcome == COMPLETE
    assert fanout(result, {"type": "done", "id": "cmp-1"}).outcome == LOST  # no tokens, no error
    assert fanout(tagged, result).outcome == LOST  # no done event


def test_an_unterminated_last_event_is_not_dispatched() -> None:
    async def events() -> list[str]:
        response = httpx.Response(200, content=b"data: 1\n\ndata: 2\r\ndata: 3\r\n\r\n: comment\n\ndata: [DONE]")
        return [d async for d in sse_data(response)]

    assert asyncio.run(events()) == ["1", "2\n3"]


# -- the client path against fake servers ------------------------------------------------------------------------


def fake_server(mode: str) -> Callable[[httpx.Request], httpx.Response]:
    """An OpenAI server whose streams are honest, or broken the ways a faulty gateway could break them."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        n = min(12, body["max_tokens"])
        finish = "length" if n >= body["max_tokens"] else "stop"
        chat = request.url.path == "/v1/chat/completions"
        events = [ROLE] + [chunk(finish=finish if i == n - 1 else None, chat=chat) for i in range(n)]
        if mode == "truncate":  # cut half-way, closed cleanly: no error event, no [DONE]
            events = events[: n // 2]
        elif mode == "fake-end":  # cut half-way and [DONE] as if it had finished
            events = [*events[: n // 2], "[DONE]"]
        elif mode == "skip-chunk":  # a token chunk lost in the relay
            events = [*events[:2], *events[3:], "[DONE]"]
        elif mode == "in-band-error":
            events = [*events[: n // 2], ERR, "[DONE]"]
        elif mode == "html-502":
            return httpx.Response(502, content=b"<html>502 Bad Gateway</html>")
        else:
            events.append("[DONE]")
        content = "".join(f"data: {e}\n\n" for e in events).encode()
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)

    return handle


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("honest", COMPLETE), ("in-band-error", ERROR), ("truncate", LOST), ("fake-end", LOST),
     ("skip-chunk", LOST), ("html-502", LOST)],
)  # fmt: skip
def test_a_gateway_that_breaks_streams_is_caught(mode: str, outcome: str) -> None:
    async def run() -> list[Verdict]:
        transport = httpx.MockTransport(fake_server(mode))
        traffic = Traffic("http://fake", ["m"], direct=True, seed=1, timeout=5, transport=transport)
        try:
            return [await traffic.one(kind, f"t-{i}") for i in range(10) for kind in ("chat-stream", "text-stream")]
        finally:
            await traffic.close()

    verdicts = asyncio.run(run())
    assert {v.outcome for v in verdicts} == {outcome}, verdicts


# -- real processes ----------------------------------------------------------------------------------------------


def soak(tmp_path: Path, *args: str, timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.soak", "--out", str(out), "--run-dir", str(tmp_path / "run"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.exists(), proc.stdout + proc.stderr
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_soak_through_the_gateway_loses_nothing(tmp_path: Path) -> None:
    code, summary, output = soak(tmp_path, "--duration", "18", "--concurrency", "16", "--kill-every", "6")
    assert code == 0, output
    outcomes = summary["outcomes"]
    assert outcomes[LOST] == 0, summary["lost_examples"]
    assert outcomes[COMPLETE] >= 300, output
    assert outcomes[ERROR] > 0 and outcomes[REJECTED] > 0 and outcomes[DISCONNECT] > 0, outcomes
    assert summary["kills"] == 2
    # drops and kills reached the client as explicit in-band errors, and 500s as error bodies
    assert summary["errors"].get("stream upstream_stream_error", 0) > 0, summary["errors"]
    assert any(label.startswith("http 500") for label in summary["errors"]), summary["errors"]
    assert all(c["ok"] for c in summary["checks"]), summary["checks"]
    assert summary["metrics"]["requests_counted"] == summary["metrics"]["requests_sent"]
    assert summary["rss"]["ok"]
    assert not [name for name, pid in summary["processes"].items() if alive(pid)]


def test_straight_at_a_dropping_emulator_streams_are_lost(tmp_path: Path) -> None:
    """Without the gateway, the emulator's drops reach the client as cut-off streams: the soak must say LOST."""
    code, summary, output = soak(tmp_path, "--direct", "--duration", "3", "--concurrency", "8", "--drop-rate", "0.3")
    assert code == 1, output
    assert summary["outcomes"][LOST] > 0
    assert summary["outcomes"][COMPLETE] > 0
    assert any("after" in e["detail"] for e in summary["lost_examples"]), summary["lost_examples"]
    assert "LOST (first examples)" in output
    assert not [name for name, pid in summary["processes"].items() if alive(pid)]


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.soak", "--duration", "60", "--concurrency", "2", "--run-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("processes:"):
                pids = [int(p.split("=")[1]) for p in line.split()[1:]]
            if line.startswith("soak:"):
                break
        assert len(pids) == 4
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert not [pid for pid in pids if alive(pid)]
