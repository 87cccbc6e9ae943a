"""Fuzzing the client-facing surface with a fixed, deterministic budget (CI runs it on every change).

The contract under test: whatever a client sends, the gateway answers a 4xx carrying an OpenAI error object
``{"error": {"message": str, "type": str, "param": ..., "code": ...}}``, or a success; never a 5xx, a dropped
connection or a stream that stops without ``data: [DONE]``. Three layers:

- hypothesis on ``gateway.protocol``: bytes in, a ParsedRequest or a ClientError out, and the body the gateway
  re-serialises for vLLM is always sendable;
- hypothesis over real sockets: random bodies, headers, content types and methods against a gateway (uvicorn)
  in front of a fast emulated vLLM, so that valid requests really succeed;
- schemathesis driven by the gateway's own ``/openapi.json``.

Every run draws the same examples (``derandomize``, a fixed schemathesis seed, no example database), so a
failure here is a reproducible bug, not flakiness. Inputs that once broke the gateway are pinned in
``test_known_hostile_inputs`` so that they are checked on every run whatever the generators draw.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from gateway.errors import ClientError
from gateway.protocol import Endpoint, ParsedRequest, parse_body, parse_request, upstream_body
from tests.conftest import card, settings_for
from tests.servers import ThreadServer

MODEL, ALIAS = "m", "alias"
DONE = b"data: [DONE]\n\n"

UNIT = settings(max_examples=300, deadline=None, derandomize=True, database=None)
HTTP = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # no explain phase: on a failure it replays the example a few hundred times over HTTP (seconds) to say which
    # parts of it matter, which the shrunk request already shows
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)

# -- strategies ------------------------------------------------------------------------------------------------

# Characters that break naive handling, mixed in because a uniform draw over Unicode almost never hits them:
# lone surrogates (legal in JSON as \u escapes, not encodable as UTF-8), NUL, line separators, quoting. (Not
# st.text(alphabet=...): it merges a one_of alphabet into one uniform set of code points, losing the bias.)
AWKWARD = st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028", '"', "\\", "\n", "é", "中"])
TEXT = st.lists(st.characters() | AWKWARD, max_size=12).map("".join)
# NaN and infinities included: Python's json (and so the gateway) accepts them from clients.
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(
    SCALAR, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4), max_leaves=12
)

MESSAGES = [{"role": "user", "content": "hi"}]
ROLE = st.sampled_from(["user", "system", "assistant", "tool", ""])
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
FIELDS = [
    "model",
    "models",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
]
# Values that are right for some field and wrong for another, so that mutations reach past the first check.
NEAR_MISS = st.sampled_from(
    [
        MODEL,
        ALIAS,
        "all",
        "",
        [MODEL],
        [ALIAS, MODEL],
        [],
        ["nope"],
        True,
        False,
        0,
        -1,
        2**63,
        1e308,
        "hi",
        ["hi", [1, 2]],
        MESSAGES,
        [{"role": "user", "content": "\ud800"}],
        [{"role": "user"}],
        ["hi"],
        {"include_usage": True},
        {"include_usage": False},
        {"include_usage": "yes"},
        {},
    ]
)
FIELD_VALUE = NEAR_MISS | JSON


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A valid request with arbitrary text and extra fields; half the time also with known fields dropped or set
    to near misses or arbitrary JSON."""
    body = dict(base)
    # the text users really send, in a shape the gateway accepts
    if "messages" in body:
        body["messages"] = draw(
            st.lists(st.fixed_dictionaries({"role": ROLE, "content": TEXT}), min_size=1, max_size=3)
        )
    if "prompt" in body:
        body["prompt"] = draw(
            TEXT | st.lists(TEXT, min_size=1, max_size=3) | st.lists(st.integers(0, 2**17), max_size=5)
        )
    body.update(draw(st.dictionaries(TEXT, JSON, max_size=2)))  # fields the gateway only forwards
    if draw(st.booleans()):
        for key in draw(st.sets(st.sampled_from(sorted(base)))):
            del body[key]
        body.update(draw(st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUE, max_size=4)))
    return body


@st.composite
def encoded(draw: st.DrawFn, value: Any) -> bytes:
    """JSON text as a client might send it: escaped, or raw UTF-8 (lone surrogates become invalid UTF-8)."""
    if draw(st.booleans()):
        return json.dumps(value).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def request_bodies(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    near = mutated(base).flatmap(encoded)
    return st.one_of(
        near,  # twice: one_of picks a branch uniformly, and these are the bodies that get furthest
        near,
        JSON.flatmap(encoded),
        st.binary(max_size=64),
        # cut short: a client that sent half its body
        st.tuples(mutated(base).flatmap(encoded), st.integers(min_value=0)).map(lambda t: t[0][: t[1] % len(t[0])]),
    )


POST_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/compare/chat/completions", "/v1/compare/completions"]
BASES = dict(
    zip(POST_PATHS, [CHAT, COMPLETION, {**CHAT, "models": [MODEL]}, {**COMPLETION, "models": "all"}], strict=True)
)
BODIES = {path: request_bodies(base) for path, base in BASES.items()}  # built once: building is not free
ANY_BODY = st.one_of(*BODIES.values())
# A route with a body meant for it (mutated) two times in three, else a body meant for any route.
ROUTE_AND_BODY = st.sampled_from(POST_PATHS).flatmap(
    lambda path: st.tuples(st.just(path), st.one_of(BODIES[path], BODIES[path], ANY_BODY))
)

# Header values httpx will put on the wire (printable ASCII, no surrounding blanks); uvicorn answers anything
# else itself before the gateway sees it.
HEADER_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
CONTENT_TYPE = (
    st.none()
    | HEADER_VALUE
    | st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/x-ndjson",
        ]
    )
)
HEADERS = st.dictionaries(
    st.sampled_from(["x-request-id", "accept", "accept-encoding", "content-encoding", "authorization", "cookie"]),
    HEADER_VALUE,
    max_size=3,
)


def url_path(text: str) -> str:
    return "/" + quote(text.encode("utf-8", "surrogatepass"), safe="/?=&")


METHOD = st.just("POST") | st.sampled_from(["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])


# -- checks ------------------------------------------------------------------------------------------------------


def openai_error_problem(content: bytes) -> str | None:
    """Why ``content`` is not an OpenAI error object, or None when it is one."""
    try:
        body = json.loads(content)
    except ValueError:
        return f"body is not JSON: {content[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f'no "error" object: {body!r:.300}'
    if not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
        return f"error.message and error.type must be strings: {error!r:.300}"
    if "param" not in error or "code" not in error:
        return f"error.param and error.code must be present: {error!r:.300}"
    return None


def check_answer(status: int, content_type: str, content: bytes, sent: str) -> None:
    assert status < 500, f"{status} for {sent}: {content[:500]!r}"
    if 400 <= status < 500:
        problem = openai_error_problem(content)
        assert problem is None, f"{status} for {sent}: {problem}"
    if status == 200 and content_type.startswith("text/event-stream"):
        assert content.endswith(DONE), f"stream not terminated for {sent}: ...{content[-300:]!r}"


# -- 1. the parser -------------------------------------------------------------------------------------------------


def parse_or_reject(raw: bytes, endpoint: Endpoint) -> ParsedRequest | None:
    """parse_request's contract: a ParsedRequest, or a ClientError with a well-formed body; nothing else."""
    try:
        parsed = parse_request(raw, endpoint)
    except ClientError as err:
        check_rejection(err)
        return None
    assert isinstance(parsed.model, str) and parsed.model
    assert isinstance(parsed.stream, bool) and isinstance(parsed.client_wants_usage, bool)
    return parsed


def check_rejection(err: ClientError) -> None:
    assert 400 <= err.status < 500
    assert openai_error_problem(err.body_bytes()) is None


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@UNIT
@given(raw=st.binary(max_size=256))
def test_parse_arbitrary_bytes(endpoint: Endpoint, raw: bytes) -> None:
    parse_or_reject(raw, endpoint)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@UNIT
@given(raw=JSON.flatmap(encoded))
def test_parse_arbitrary_json(endpoint: Endpoint, raw: bytes) -> None:
    parse_or_reject(raw, endpoint)


@UNIT
@given(data=st.data())
def test_parse_wrong_types_in_known_fields(data: st.DataObject) -> None:
    endpoint: Endpoint = data.draw(st.sampled_from(["chat", "completions"]))
    body = data.draw(mutated(CHAT if endpoint == "chat" else COMPLETION))
    raw = data.draw(encoded(body))
    parsed = parse_or_reject(raw, endpoint)
    # What the compare routes call on an already-decoded body: the object the bytes decode to. (Not ``body``
    # itself: a surrogate pair drawn as two code points, "\ud800\udc00", is escaped by json.dumps and decoded back
    # as one character, U+10000. Hypothesis found that example; which one it draws depends on the hash seed.)
    with contextlib.suppress(ValueError):
        body = json.loads(raw.decode("utf-8", "surrogatepass"))
    try:
        direct = parse_body(body, endpoint)
    except ClientError as err:
        check_rejection(err)
        # the bytes may be rejected where the object is not (invalid UTF-8), never the other way round
        assert parsed is None
    else:
        assert parsed is None or parsed.model == direct.model


# Bodies no generator above is likely to draw (depth, size), checked on every run.
HOSTILE_BODIES = [
    pytest.param(b"[" * 10_000, id="deeply-nested-array"),
    pytest.param(b'{"a":' * 10_000, id="deeply-nested-object"),
    pytest.param(b'{"model":"m","messages":[' + b"[" * 10_000 + b"]}", id="deeply-nested-field"),
    pytest.param(b'{"model":"m","prompt":"hi","max_tokens":' + b"9" * 5_000 + b"}", id="5000-digit-integer"),
    pytest.param(b"\xef\xbb\xbf" + json.dumps(CHAT).encode(), id="utf-8-bom"),
    pytest.param(json.dumps(CHAT).encode("utf-16"), id="utf-16"),
]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("raw", HOSTILE_BODIES)
def test_parse_hostile_bodies(endpoint: Endpoint, raw: bytes) -> None:
    parse_or_reject(raw, endpoint)


@UNIT
@given(data=st.data())
def test_upstream_body_is_always_sendable(data: st.DataObject) -> None:
    """Whatever the gateway accepted, the body it sends on (alias replaced, usage asked for) is UTF-8 JSON."""
    endpoint: Endpoint = data.draw(st.sampled_from(["chat", "completions"]))
    raw = data.draw(mutated(CHAT if endpoint == "chat" else COMPLETION).flatmap(encoded))
    parsed = parse_or_reject(raw, endpoint)
    if parsed is None:
        return
    same = json.loads(upstream_body(parse_request(raw, endpoint), raw, parsed.model))  # no alias: maybe spliced
    usage = {"stream_options": {**(parsed.body.get("stream_options") or {}), "include_usage": True}}
    assert same == ({**parsed.body, **usage} if parsed.stream and not parsed.client_wants_usage else parsed.body)
    body = json.loads(upstream_body(parsed, raw, "served/model-id"))
    assert body["model"] == "served/model-id"
    if parsed.stream:
        assert body["stream_options"]["include_usage"] is True


# -- 2. HTTP, over real sockets -----------------------------------------------------------------------------------


class Crashes:
    """Pure ASGI wrapper that keeps what the gateway raises, so that a failing test shows the server's traceback.

    Left to uvicorn, that traceback would be formatted in the server's thread while pytest formats its report
    in the main one; on CPython 3.11 both use ``ast`` (traceback carets, pytest's source ranges), whose
    recursion guard is shared by all threads, and the race ends the run with an INTERNALERROR ("SystemError:
    AST constructor recursion depth mismatch", cpython#106905, pytest#10874)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.raised: list[Exception] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # the gateway's 500 (or its cut connection) has already gone out
            self.raised.append(exc)

    def report(self) -> str:
        text = "".join("".join(traceback.format_exception(exc)) for exc in self.raised)
        self.raised.clear()
        return f"\n--- the gateway raised:\n{text}" if text else ""


@dataclass
class Served:
    url: str
    crashes: Crashes


@pytest.fixture(scope="module")
def gateway() -> Iterator[Served]:
    """A gateway over one fast emulated vLLM; the model also has an alias, which makes the gateway re-serialise."""
    emulator = create_emulator_app(EmulatorConfig(model=MODEL, ttft_ms=1, itl_ms=1, output_tokens=3))
    with ThreadServer(emulator) as backend:
        settings = settings_for(
            [{"name": "emu", "base_url": backend.url, "models": [MODEL]}],
            [card(MODEL, "qwen3", "Alibaba", "CN", aliases=[ALIAS])],
        )
        crashes = Crashes(create_app(settings))
        with ThreadServer(crashes) as gw:
            yield Served(gw.url, crashes)


class Api:
    """Sends one request to the gateway and checks the answer against the contract."""

    def __init__(self, http: httpx.Client, crashes: Crashes) -> None:
        self.http = http
        self.crashes = crashes

    def send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> int:
        sent = f"{method} {path} headers={headers!r} body={body[:300]!r}"
        self.crashes.raised.clear()
        try:
            response = self.http.request(method, path, content=body, headers=headers)
        except httpx.TransportError as exc:  # the gateway dropped the connection, or cut a stream short
            self.fail(f"{type(exc).__name__} ({exc}) for {sent}", crashed=True)
        try:
            check_answer(response.status_code, response.headers.get("content-type", ""), response.content, sent)
        except AssertionError as exc:
            self.fail(str(exc), crashed=response.status_code >= 500)
        return response.status_code

    def fail(self, message: str, *, crashed: bool) -> NoReturn:
        deadline = time.monotonic() + (1.0 if crashed else 0.0)
        while not self.crashes.raised and time.monotonic() < deadline:
            time.sleep(0.01)  # the server records its exception just after answering
        raise AssertionError(message + self.crashes.report()) from None


@pytest.fixture(scope="module")
def api(gateway: Served) -> Iterator[Api]:
    with httpx.Client(base_url=gateway.url, timeout=10.0) as http:
        yield Api(http, gateway.crashes)


def test_valid_requests_succeed(api: Api) -> None:
    """The fuzzing below means something only if well-formed requests get through."""
    for path, body in [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {**COMPLETION, "model": ALIAS, "stream": True}),
        ("/v1/compare/chat/completions", {**CHAT, "models": "all"}),
    ]:
        response = api.http.post(path, json=body)
        assert response.status_code == 200, response.text


@pytest.mark.slow
@HTTP
@given(route_and_body=ROUTE_AND_BODY, content_type=CONTENT_TYPE, headers=HEADERS)
def test_http_random_bodies(
    api: Api, route_and_body: tuple[str, bytes], content_type: str | None, headers: dict[str, str]
) -> None:
    path, body = route_and_body
    if content_type is not None:
        headers = {**headers, "content-type": content_type}
    event(f"POST {path} -> {api.send('POST', path, body, headers)}")  # the spread shows in --hypothesis-show-statistics


@pytest.mark.slow
@HTTP
@given(
    method=METHOD,
    path=st.sampled_from(POST_PATHS) | st.sampled_from(POST_PATHS).map(lambda p: p + "/") | TEXT.map(url_path),
    route_and_body=ROUTE_AND_BODY,
)
def test_http_random_methods_and_paths(api: Api, method: str, path: str, route_and_body: tuple[str, bytes]) -> None:
    status = api.send(method, path, route_and_body[1], {"content-type": "application/json"})
    event(f"{method} {path if path in POST_PATHS else '(other path)'} -> {status}")


# Reproducers of inputs that broke the gateway, kept so that every run checks them whatever the generators draw.
KNOWN = [
    pytest.param("POST", "/v1/chat/completions", b"[" * 10_000, id="deeply-nested-json"),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}],"stream":true}',
        id="lone-surrogate-stream",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        b'{"model":"alias","messages":[{"role":"user","content":"\\ud800"}]}',
        id="lone-surrogate-alias",
    ),
    pytest.param(
        "POST",
        "/v1/compare/chat/completions",
        b'{"models":["m"],"messages":[{"role":"user","content":"\\ud800"}]}',
        id="lone-surrogate-compare",
    ),
    pytest.param(
        "POST",
        "/v1/compare/chat/completions",
        b'{"models":["m"],"messages":[{"role":"user","content":"\\ud800"}],"stream":true}',
        id="lone-surrogate-compare-stream",
    ),
    pytest.param("GET", "/v1/compare?limit=x", b"", id="compare-list-bad-limit"),
]


@pytest.mark.parametrize(("method", "path", "body"), KNOWN)
def test_known_hostile_inputs(api: Api, method: str, path: str, body: bytes) -> None:
    api.send(method, path, body, {"content-type": "application/json"})


# -- 3. schemathesis, from the gateway's OpenAPI schema ---------------------------------------------------------


def unresolved_refs(node: Any, root: dict[str, Any]) -> list[str]:
    """Every local ``$ref`` under ``node`` that does not resolve in ``root`` (the whole OpenAPI document)."""
    found: list[str] = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            if target is None:
                found.append(ref)
        for value in node.values():
            found += unresolved_refs(value, root)
    elif isinstance(node, list):
        for value in node:
            found += unresolved_refs(value, root)
    return found


@pytest.fixture(scope="module")
def openapi_spec(api: Api) -> dict[str, Any]:
    response = api.http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def test_openapi_refs_resolve(openapi_spec: dict[str, Any]) -> None:
    assert unresolved_refs(openapi_spec, openapi_spec) == []


@pytest.fixture(scope="module")
def gateway_schema(gateway: Served, openapi_spec: dict[str, Any]) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": 20261129,
            "base-url": gateway.url,
            "generation": {"max-examples": 30, "deterministic": True, "database": "none"},
            # stateful (link-following) testing has nothing to follow here: no operation creates what another reads
            "phases": {"stateful": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_dict(openapi_spec, config=config)


@pytest.fixture
def node_id_shim(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32.5's from_fixture reads and rewrites ``Node._nodeid``, which pytest 9.2 replaced by
    ``Node._id``; give it the attribute back (its rewrite, used only to name sub-tests, is then ignored)."""
    request.node._nodeid = request.node.nodeid


def openai_errors(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> None:
    """Every 4xx is an OpenAI error object (schemathesis' own checks know nothing of this contract)."""
    if 400 <= response.status_code < 500:
        problem = openai_error_problem(response.content)
        assert problem is None, f"{response.status_code}: {problem}"


openapi = schemathesis.pytest.from_fixture("gateway_schema")


@pytest.mark.slow
@pytest.mark.usefixtures("node_id_shim")
@openapi.parametrize()
def test_openapi(case: schemathesis.Case[Any]) -> None:
    if isinstance(case.body, dict):
        # A generated model name is unknown (404 before anything else is read); name the served model so that
        # schema-valid requests go all the way to the backend.
        if isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        if isinstance(case.body.get("models"), list):
            case.body["models"] = [MODEL]
    # response_schema_conformance passes, but proves little: most routes document their responses as any JSON.
    case.call_and_validate(checks=[not_a_server_error, openai_errors, response_schema_conformance])
