"""The compare page (``GET /ui``) in real headless Chromium, driven by Selenium, against real servers on loopback.

Three vLLM emulators (fast, slow, one that drops every stream half-way) and a recording backend whose answer is
hostile HTML sit behind the gateway. Needs Debian's ``chromium`` and ``chromium-driver`` packages; fails (never
skips) without them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.devstack.emulator import EmulatorConfig, create_emulator_app
from tests.backends import Recorder
from tests.conftest import card, settings_for
from tests.servers import ThreadServer

pytestmark = pytest.mark.slow  # left out of scripts/test.sh --quick

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

FAST = EmulatorConfig(model="emu/qwen3", ttft_ms=60, itl_ms=10, output_tokens=24)
SLOW = EmulatorConfig(model="emu/llama", ttft_ms=300, itl_ms=10, output_tokens=400)  # long enough to Stop
BROKEN = EmulatorConfig(model="emu/deepseek", ttft_ms=60, itl_ms=10, output_tokens=24, drop_rate=1.0)
HOSTILE = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2"><b>bold?</b>'
THOUGHT = '<i>hmm</i> <img src=x onerror="window.__xss=3">'
MODELS = ["emu/qwen3", "emu/llama", "emu/deepseek", "fake/html"]


def _hostile_stream() -> list[bytes]:
    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        body = {
            "id": "c1",
            "created": 1,
            "model": "M",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    usage = {
        "id": "c1",
        "created": 1,
        "model": "M",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning": THOUGHT[:9]}),  # a thinking model's reasoning (vLLM 0.32's field), hostile too
        chunk({"reasoning": THOUGHT[9:]}),
        chunk({"content": HOSTILE[:20]}),  # split inside the tag: textContent must not care
        chunk({"content": HOSTILE[20:]}),
        chunk({"content": " ok"}, "stop"),
        b"data: " + json.dumps(usage).encode() + b"\n\n",
        b"data: [DONE]\n\n",
    ]


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        emulators = {
            cfg.model: stack.enter_context(ThreadServer(create_emulator_app(cfg))) for cfg in (FAST, SLOW, BROKEN)
        }
        fake = stack.enter_context(ThreadServer(Recorder(chunks=_hostile_stream(), chunk_delay=0.02).app()))
        backends = [{"name": f"b-{m.split('/')[1]}", "base_url": s.url, "models": [m]} for m, s in emulators.items()]
        backends.append({"name": "b-fake", "base_url": fake.url, "models": ["fake/html"]})
        settings = settings_for(
            backends,
            [
                card("emu/qwen3", "qwen3", "Alibaba", "CN", emulated=True),
                card("emu/llama", "llama", "Meta", "US", emulated=True),
                card("emu/deepseek", "deepseek", "DeepSeek", "CN", emulated=True),
                card("fake/html", "fake", "Test", "US", aliases=[]),
            ],
        )
        gateway = stack.enter_context(ThreadServer(create_app(settings)))
        yield gateway.url


UI_KEY = "gk-ui-admin-0123456789abcdef0123456789abcdef"


@dataclass
class Keyed:
    url: str  # a gateway with API keys on (one admin key, 1,000 requests a minute), in front of the fast emulator
    friend: str  # a page on another loopback port, an origin in the gateway's cors_origins
    stranger: str  # a page on a third port, an origin it does not list


def page_server() -> ThreadServer:
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse("<!doctype html><title>elsewhere</title><p>another origin</p>")

    return ThreadServer(Starlette(routes=[Route("/", page)]))


@pytest.fixture(scope="module")
def keyed() -> Iterator[Keyed]:
    with contextlib.ExitStack() as stack:
        emulator = stack.enter_context(ThreadServer(create_emulator_app(FAST)))
        friend, stranger = stack.enter_context(page_server()), stack.enter_context(page_server())
        settings = settings_for(
            [{"name": "b-qwen3", "base_url": emulator.url, "models": [FAST.model]}],
            [card(FAST.model, "qwen3", "Alibaba", "CN", emulated=True)],
            auth={"keys": [{"name": "ui", "sha256": hash_key(UI_KEY), "admin": True, "rpm": 1000}]},
            cors_origins=[friend.url],
        )
        gateway = stack.enter_context(ThreadServer(create_app(settings)))
        yield Keyed(gateway.url, f"{friend.url}/", f"{stranger.url}/")


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run `apt-get update && apt-get install -y chromium chromium-driver`"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def wait(driver: WebDriver, timeout: float = 10) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def columns(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#columns .model-col")


def col(driver: WebDriver, model: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'.model-col[data-model="{model}"]')


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(f"{url}/ui")
    wait(driver).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input[type=checkbox]")) == len(MODELS),
        "the model checkboxes never appeared",
    )


# Records what the page shows while it streams, so the test can tell "grew per chunk" from "appeared at once".
OBSERVE = """
window.__seen = {answer: {}, tps: {}};
new MutationObserver((records) => {
  for (const r of records) {
    const node = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    const column = node && node.closest('.model-col');
    if (!column) continue;
    for (const key of ['answer', 'tps']) {
      const box = column.querySelector('.' + key);
      if (box && box.contains(node)) (window.__seen[key][column.dataset.model] ||= []).push(box.textContent);
    }
  }
}).observe(document.querySelector('#columns'), {subtree: true, childList: true, characterData: true});
"""


def test_compare_streams_side_by_side(driver: WebDriver, gateway_url: str, tmp_path: Path) -> None:
    open_page(driver, gateway_url)
    labels = {e.get_attribute("data-model"): e.text for e in driver.find_elements(By.CSS_SELECTOR, "#models label")}
    assert list(labels) == MODELS
    assert "CN" in labels["emu/qwen3"] and "US" in labels["emu/llama"] and "CN" in labels["emu/deepseek"]
    assert "(emulator)" in labels["emu/qwen3"] and "(emulator)" not in labels["fake/html"]
    assert all(box.is_selected() for box in driver.find_elements(By.CSS_SELECTOR, "#models input"))
    max_tokens = driver.find_element(By.ID, "max-tokens")
    assert max_tokens.get_attribute("value") == "128"
    assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0"
    recent_before = len(driver.find_elements(By.CSS_SELECTOR, "#recent li"))

    driver.find_element(By.ID, "prompt").send_keys("Who are you? <script>window.__xss=1</script>")
    max_tokens.clear()
    max_tokens.send_keys("24")
    driver.execute_script(OBSERVE)
    driver.find_element(By.ID, "compare").click()
    wait(driver).until(
        lambda d: (
            d.find_element(By.ID, "status").text.startswith("done")
            and all(c.get_attribute("data-state") in ("done", "error") for c in columns(d))
        ),
        "the comparison did not finish",
    )

    # one column per model, in one row, left to right, not overlapping
    cols = columns(driver)
    assert [c.get_attribute("data-model") for c in cols] == MODELS
    rects = [c.rect for c in cols]
    assert len({round(r["y"]) for r in rects}) == 1, rects
    assert all(a["x"] + a["width"] <= b["x"] for a, b in itertools.pairwise(rects)), rects
    assert rects[-1]["x"] + rects[-1]["width"] <= 1280

    answers = {m: col(driver, m).find_element(By.CLASS_NAME, "answer").text for m in MODELS}
    for model in ("emu/qwen3", "emu/llama"):
        column = col(driver, model)
        assert column.get_attribute("data-state") == "done"
        assert len(answers[model].split()) == 24, answers[model]
        assert column.find_element(By.CLASS_NAME, "error").text == ""
        ttft_ms = float(column.find_element(By.CLASS_NAME, "ttft").get_attribute("data-ms") or "nan")
        emulator = FAST if model == "emu/qwen3" else SLOW
        assert emulator.ttft_ms <= ttft_ms < emulator.ttft_ms + 3000, (model, ttft_ms)
        assert column.find_element(By.CLASS_NAME, "ttft").text.endswith(" ms")
        tps = float(column.find_element(By.CLASS_NAME, "tps").get_attribute("data-value") or "nan")
        assert 5 < tps < 1000, (model, tps)  # the server's figure for ~10 ms between tokens
        assert column.find_element(By.CLASS_NAME, "tokens").text.endswith("/ 24")
        assert column.find_element(By.CLASS_NAME, "cost-gpu").text.startswith("$")
        assert column.find_element(By.CLASS_NAME, "cost-list").text.startswith("$")
        assert column.find_element(By.CLASS_NAME, "tpot").text.endswith(" ms")
    ttft = {
        m: float(col(driver, m).find_element(By.CLASS_NAME, "ttft").get_attribute("data-ms") or "nan")
        for m in MODELS[:2]
    }
    assert ttft["emu/llama"] > ttft["emu/qwen3"] + 150, ttft

    seen: dict[str, dict[str, list[str]]] = driver.execute_script("return window.__seen")
    assert len(set(seen["answer"]["emu/qwen3"])) >= 10, "the answer did not grow chunk by chunk"
    assert any(t.startswith("~") for t in seen["tps"]["emu/llama"]), "no live tokens/s estimate while streaming"

    broken = col(driver, "emu/deepseek")
    error = broken.find_element(By.CLASS_NAME, "error")
    assert broken.get_attribute("data-state") == "error" and error.text and error.is_displayed()
    assert error.value_of_css_property("color") == "rgba(192, 38, 45, 1)"
    assert 0 < len(answers["emu/deepseek"].split()) < 24  # cut off half-way, while the others finished

    # model output is text, never markup: nothing ran, no element was made from it
    fake = col(driver, "fake/html").find_element(By.CLASS_NAME, "answer")
    assert fake.text == HOSTILE + " ok"
    assert fake.find_elements(By.CSS_SELECTOR, "*") == []
    # its reasoning is kept apart from the answer, collapsed: shown only once opened
    thinking = col(driver, "fake/html").find_element(By.CSS_SELECTOR, "details.thinking")
    assert thinking.is_displayed() and thinking.get_attribute("open") is None
    assert thinking.find_element(By.TAG_NAME, "summary").text == f"reasoning ({len(THOUGHT)} chars)"
    thought = thinking.find_element(By.CLASS_NAME, "thought")
    assert not thought.is_displayed()
    thinking.find_element(By.TAG_NAME, "summary").click()
    assert thought.is_displayed() and thought.text == THOUGHT and thought.find_elements(By.CSS_SELECTOR, "*") == []
    ttfat = {m: float(col(driver, m).find_element(By.CLASS_NAME, "ttfat").get_attribute("data-ms") or "nan")
             for m in ("emu/qwen3", "fake/html")}  # fmt: skip
    fake_ttft = float(col(driver, "fake/html").find_element(By.CLASS_NAME, "ttft").get_attribute("data-ms") or "nan")
    assert ttfat["fake/html"] > fake_ttft and ttfat["emu/qwen3"] == ttft["emu/qwen3"]  # the answer after the thinking
    assert not col(driver, "emu/qwen3").find_element(By.CSS_SELECTOR, "details.thinking").is_displayed()
    assert driver.execute_script("return window.__xss") is None

    shot = tmp_path / "ui.png"
    assert driver.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")

    # the comparison was stored: the recent list gains it, and clicking it shows the stored answers
    cmp_id = driver.find_element(By.ID, "view-title").text.split()[-1]
    assert cmp_id.startswith("cmp-")
    wait(driver).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recent li")) == recent_before + 1)
    newest = driver.find_element(By.CSS_SELECTOR, "#recent li")
    assert newest.get_attribute("data-id") == cmp_id and "1 error" in newest.text
    newest.click()
    wait(driver).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '.model-col[data-source="stored"]')) == len(MODELS),
        "the stored comparison was not shown",
    )
    assert driver.find_element(By.ID, "view-title").text == f"Stored comparison {cmp_id}"
    stored = {c.get_attribute("data-model"): c for c in columns(driver)}
    assert set(stored) == set(MODELS)
    for model in ("emu/qwen3", "emu/llama", "fake/html"):
        assert stored[model].find_element(By.CLASS_NAME, "answer").text == answers[model]
        assert stored[model].find_element(By.CLASS_NAME, "ttft").text.endswith(" ms")
    assert stored["emu/llama"].find_element(By.CSS_SELECTOR, ".badge.origin").text == "US"
    assert stored["emu/deepseek"].find_element(By.CLASS_NAME, "error").text
    assert stored["fake/html"].find_element(By.CLASS_NAME, "answer").find_elements(By.CSS_SELECTOR, "*") == []
    stored_thought = stored["fake/html"].find_element(By.CSS_SELECTOR, "details.thinking")
    assert stored_thought.is_displayed() and stored_thought.get_attribute("open") is None
    assert stored_thought.find_element(By.CLASS_NAME, "thought").get_attribute("textContent") == THOUGHT
    assert driver.execute_script("return window.__xss") is None


def test_stop_aborts_the_stream(driver: WebDriver, gateway_url: str) -> None:
    open_page(driver, gateway_url)
    for box in driver.find_elements(By.CSS_SELECTOR, "#models input"):
        if box.get_attribute("value") != "emu/llama":
            box.click()
    max_tokens = driver.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("400")  # about 4 s of tokens
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("Go on and on.", Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut starts it too
    answer = col(driver, "emu/llama").find_element(By.CLASS_NAME, "answer")
    wait(driver).until(lambda d: len(answer.text.split()) >= 3, "no tokens arrived")
    driver.find_element(By.ID, "stop").click()
    wait(driver).until(lambda d: col(d, "emu/llama").get_attribute("data-state") == "stopped")
    stopped_at = answer.text
    time.sleep(0.3)
    assert answer.text == stopped_at and len(stopped_at.split()) < 400
    assert driver.find_element(By.ID, "compare").is_enabled()
    assert not driver.find_element(By.ID, "stop").is_enabled()


def test_request_errors_show_the_gateway_message(driver: WebDriver, gateway_url: str) -> None:
    open_page(driver, gateway_url)
    for box in driver.find_elements(By.CSS_SELECTOR, "#models input"):
        box.click()  # none chosen: the gateway answers 400 before streaming
    driver.find_element(By.ID, "compare").click()
    banner = driver.find_element(By.ID, "banner")
    wait(driver).until(lambda d: banner.is_displayed(), "no error banner")
    assert "models" in banner.text and "non-empty list" in banner.text
    assert columns(driver) == []


# Stands in for fetch() on the compare route only: answers 200 with the given bytes, one read per piece.
FAKE_FETCH = """
const pieces = arguments[0].map((p) => new Uint8Array(p));
const real = window.fetch;
window.fetch = (url, init) => {
  if (String(url) !== '/v1/compare/chat/completions') return real(url, init);
  window.__sent = JSON.parse(init.body);
  let i = 0;
  const body = new ReadableStream({
    pull(controller) { if (i < pieces.length) controller.enqueue(pieces[i++]); else controller.close(); },
  });
  return Promise.resolve(new Response(body, {status: 200, headers: {'content-type': 'text/event-stream'}}));
};
"""


def _sse(*events: object, crlf: bool = True) -> bytes:
    end = "\r\n" if crlf else "\n"
    frames = [": keep-alive" + end * 2]
    frames += [f"data: {e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)}{end}{end}" for e in events]
    return "".join(frames).encode()


def _chunk(model: str, content: str, **delta: str) -> dict[str, object]:
    delta["content"] = content
    return {"model": model, "type": "chunk", "chunk": {"choices": [{"index": 0, "delta": delta}]}}


@pytest.mark.parametrize("piece", [1, 7, 100_000], ids=["byte-by-byte", "7-bytes", "one-read"])
def test_sse_frames_split_anywhere_and_crlf(driver: WebDriver, gateway_url: str, piece: int) -> None:
    metrics = {"ttft_s": 0.1, "tpot_s": 0.02, "e2e_s": 0.3, "prompt_tokens": 4, "completion_tokens": 3,
               "output_tokens_per_s": 42.5, "cost_usd": {"gpu_time": 0.0001, "list_price": 0.00012}}  # fmt: skip
    raw = _sse(
        _chunk("emu/qwen3", "", role="assistant"),
        _chunk("emu/qwen3", "héllo 模型"),
        _chunk("emu/llama", "second\nline"),
        _chunk("emu/qwen3", " 🙂 <b>x</b>"),
        {"type": "result", "model": "emu/qwen3", "backend": "b", "error": None, "metrics": metrics},
        {"type": "result", "model": "emu/llama", "backend": "b", "metrics": {},
         "error": {"message": "boom", "type": "InternalServerError", "code": 500}},
        {"type": "done", "id": "cmp-fake"},
        "[DONE]",
        crlf=piece != 7,  # plain LF once, CRLF (split between reads when byte by byte) otherwise
    )  # fmt: skip
    open_page(driver, gateway_url)
    for box in driver.find_elements(By.CSS_SELECTOR, "#models input"):
        if box.get_attribute("value") not in ("emu/qwen3", "emu/llama"):
            box.click()
    driver.execute_script(FAKE_FETCH, [list(raw[i : i + piece]) for i in range(0, len(raw), piece)])
    driver.find_element(By.ID, "prompt").send_keys("hi")
    driver.find_element(By.ID, "compare").click()
    wait(driver).until(lambda d: d.find_element(By.ID, "status").text.endswith("cmp-fake"), "the stream did not end")

    sent = driver.execute_script("return window.__sent")
    assert sent == {"models": ["emu/qwen3", "emu/llama"], "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 128, "temperature": 0, "stream": True}  # fmt: skip
    qwen, llama = col(driver, "emu/qwen3"), col(driver, "emu/llama")
    assert qwen.find_element(By.CLASS_NAME, "answer").text == "héllo 模型 🙂 <b>x</b>"
    assert qwen.get_attribute("data-state") == "done"
    assert qwen.find_element(By.CLASS_NAME, "tps").text == "42.5 tok/s"
    assert qwen.find_element(By.CLASS_NAME, "cost-list").text == "$0.00012"
    assert qwen.find_element(By.CLASS_NAME, "tokens").text == "4 / 3"
    assert llama.find_element(By.CLASS_NAME, "answer").text == "second\nline"
    assert llama.find_element(By.CLASS_NAME, "error").text == "boom"
    assert llama.get_attribute("data-state") == "error"


def test_with_keys_on_the_page_asks_for_a_key_and_sends_it(driver: WebDriver, keyed: Keyed) -> None:
    driver.get(f"{keyed.url}/ui")  # the page itself needs no key (auth.public_ui)
    banner = driver.find_element(By.ID, "banner")
    wait(driver).until(lambda d: banner.is_displayed(), "no message about the missing key")
    assert "needs an API key" in banner.text and "enter yours in the API key field" in banner.text
    assert driver.find_element(By.ID, "models").text == "an API key is needed"
    key = driver.find_element(By.ID, "api-key")
    assert key.get_attribute("type") == "password"
    assert driver.switch_to.active_element == key

    key.send_keys("gk-wrong", Keys.ENTER)
    wait(driver).until(lambda d: "refused this API key" in banner.text, "a wrong key was not reported")
    key.clear()
    driver.find_element(By.ID, "api-key").send_keys(UI_KEY)
    driver.find_element(By.ID, "use-key").click()
    wait(driver).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input[type=checkbox]")) == 1, "no models with the key"
    )
    assert not banner.is_displayed()
    assert driver.execute_script("return sessionStorage.getItem('gateway-api-key')") == UI_KEY

    driver.refresh()  # the key stays for this tab: the page works at once, stream and stored results included
    wait(driver).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input")) == 1, "the key was lost")
    driver.find_element(By.ID, "prompt").send_keys("hi")
    driver.find_element(By.ID, "compare").click()
    wait(driver).until(lambda d: d.find_element(By.ID, "status").text.startswith("done"), "the comparison failed")
    assert len(col(driver, FAST.model).find_element(By.CLASS_NAME, "answer").text.split()) == FAST.output_tokens
    wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recent li"), "no stored comparisons listed")
    driver.find_element(By.CSS_SELECTOR, "#recent li").click()
    wait(driver).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '.model-col[data-source="stored"]'), "a stored comparison failed"
    )


# A cross-origin call as a browser app makes it: JSON and a Bearer key, so the browser sends a preflight first.
CROSS_ORIGIN_CALL = """
const [url, key, done] = arguments;
const headers = {"content-type": "application/json"};
if (key) headers.authorization = "Bearer " + key;
const body = JSON.stringify({model: "emu/qwen3", messages: [{role: "user", content: "hi"}], max_tokens: 4});
fetch(url, {method: "POST", headers, body})
  .then(async (r) => done({status: r.status, body: await r.json(),
                           remaining: r.headers.get("x-ratelimit-remaining-requests")}))
  .catch((e) => done({failed: String(e)}));
"""


def test_a_page_on_an_allowed_origin_calls_the_keyed_api(driver: WebDriver, keyed: Keyed) -> None:
    url = f"{keyed.url}/v1/chat/completions"
    driver.get(keyed.friend)
    answer = driver.execute_async_script(CROSS_ORIGIN_CALL, url, UI_KEY)
    assert answer.get("status") == 200, answer
    assert answer["body"]["choices"][0]["message"]["content"]
    assert str(answer["remaining"]).isdigit()  # an exposed header: without that the page would read null
    refused = driver.execute_async_script(CROSS_ORIGIN_CALL, url, None)  # readable: the 401 carries CORS headers
    assert refused.get("status") == 401 and refused["body"]["error"]["code"] == "invalid_api_key", refused
    driver.get(keyed.stranger)
    blocked = driver.execute_async_script(CROSS_ORIGIN_CALL, url, UI_KEY)
    assert blocked == {"failed": "TypeError: Failed to fetch"}


def test_the_report_draws_accuracy_against_cost_with_the_pareto_front(driver: WebDriver, tmp_path: Path) -> None:
    """#16: report.html, opened in the browser, shows both quality scatters; the Pareto front's dots are filled and
    joined by a line, the dominated arm's dot is hollow, every dot carries its arm's name."""
    from gateway.compare.report import write_report
    from tests.test_quality import CARDS, results

    rows = results()
    rows += [replace(r, variant="slow", ttfat_s=0.9, correct=int(r.prompt_id in ("i0", "i1"))) for r in rows
             if r.model == "q"]  # fmt: skip  # q+slow: less accurate than q, and slower: dominated
    paths = write_report(rows, CARDS, tmp_path)
    driver.get(paths.html.as_uri())
    plots = driver.find_elements(By.CSS_SELECTOR, "svg.scatter")
    assert len(plots) == 2 and all(p.is_displayed() and p.size["width"] > 300 for p in plots)
    time_plot = plots[1]
    front = {c.find_element(By.TAG_NAME, "title").get_attribute("textContent")
             for c in time_plot.find_elements(By.CSS_SELECTOR, "circle.pareto")}  # fmt: skip
    beaten = {c.find_element(By.TAG_NAME, "title").get_attribute("textContent")
              for c in time_plot.find_elements(By.CSS_SELECTOR, "circle.point")}  # fmt: skip
    assert front == {"q", "l"} and beaten == {"q+slow"}, (front, beaten)  # l: fastest; q: most accurate
    assert time_plot.find_element(By.CSS_SELECTOR, "polyline.front").is_displayed()
    dots = time_plot.find_elements(By.CSS_SELECTOR, "circle")
    assert all(d.value_of_css_property("fill") != "none" for d in dots)
    assert "Pareto front" in driver.find_element(By.TAG_NAME, "body").text
