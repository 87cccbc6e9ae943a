"""The report files from a fixed run: three models (two CN, one US), 4 prompts x 2 repeats, one failed call.

Every expected number is worked out by hand from the data below, not by calling the code under test.
"""

from __future__ import annotations

import csv
import html
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.compare.report import ReportPaths, write_report
from gateway.compare.store import COLUMNS, CallResult
from gateway.config import Gpu, ListPrice, ModelCard

QWEN, DEEPSEEK, LLAMA = "tiny-qwen3", "tiny-deepseek", "tiny-llama"
CARDS = {
    QWEN: ModelCard(id=QWEN, family="qwen3", origin="CN", gpu=Gpu(type="H100", count=2, usd_per_hour=1.8),
                    list_price=ListPrice(input_per_1m=0.5, output_per_1m=2.0)),
    DEEPSEEK: ModelCard(id=DEEPSEEK, family="deepseek", origin="CN", gpu=Gpu(type="H100", count=2, usd_per_hour=1.0)),
    LLAMA: ModelCard(id=LLAMA, family="llama", origin="US", gpu=Gpu(type="H100", count=1, usd_per_hour=1.8),
                     list_price=ListPrice(input_per_1m=0.2, output_per_1m=0.6)),
}  # fmt: skip
# TTFT of call k = 2 x prompt + repeat; None marks deepseek's failed call (prompt p2, repeat 1).
TTFT: dict[str, list[float | None]] = {
    QWEN: [0.100, 0.120, 0.140, 0.160, 0.180, 0.200, 0.220, 0.240],
    DEEPSEEK: [0.500, 0.400, 0.600, 0.450, 0.550, None, 0.700, 0.650],
    LLAMA: [0.300, 0.250, 0.350, 0.200, 0.400, 0.450, 0.280, 0.320],
}
TPOT = {QWEN: 0.020, DEEPSEEK: 0.025, LLAMA: 0.010}
TOKENS = {QWEN: 90, DEEPSEEK: 100, LLAMA: 180}
ERROR = "HTTP 500: upstream <b>exploded</b>"
LONG = "long answer " * 100  # 1200 characters: truncated to 600 in the HTML


HEADINGS = (
    "How to read this", "Summary", "By origin: CN vs US", "TTFT distribution", "TPOT distribution", "Output speed",
    "Cost per 1M output tokens", "Paired comparisons", "Answers side by side",
)  # fmt: skip


def answer(model: str, k: int) -> str:
    if model == QWEN and k == 0:
        return "Hello <script>alert('x')</script> & goodbye"
    if model == LLAMA and k == 0:
        return 'see <img src="https://example.com/x.png"> and <a href="http://example.com">this</a>'
    if model == LLAMA and k == 2:
        return LONG
    return f"{model} answer {k}: 长城"


def results() -> list[CallResult]:
    out = []
    for model in (QWEN, DEEPSEEK, LLAMA):
        for k, ttft in enumerate(TTFT[model]):
            ok = ttft is not None
            out.append(
                CallResult(
                    comparison_id="run-1", kind="run", model=model, prompt_id=f"p{k // 2}",
                    prompt_category="chinese" if k // 2 == 3 else "short chat", repeat=k % 2, backend=f"{model}-a",
                    family=CARDS[model].family, origin=CARDS[model].origin, ttft_s=ttft,
                    tpot_s=TPOT[model] if ok else None, e2e_s=2.0 if ok else None,
                    prompt_tokens=20 if ok else 0, completion_tokens=TOKENS[model] if ok else 0,
                    output_tps=1 / TPOT[model] if ok else None, finish_reason="length" if ok else None,
                    text=answer(model, k) if ok else None, error=None if ok else ERROR,
                    # one call every 10 s, each lasting 2 s: every model's active window is 1000 -> 1072, i.e. 72 s
                    created_at=1000.0 + 10 * k,
                )
            )  # fmt: skip
    return out


@pytest.fixture
def report(tmp_path: Path) -> ReportPaths:
    return write_report(
        results(), CARDS, tmp_path / "out", title="Tiny <models>", generated_at=datetime(2025, 1, 2, 3, 4, tzinfo=UTC)
    )


def test_files_exist(report: ReportPaths, tmp_path: Path) -> None:
    assert {report.csv.name, report.markdown.name, report.html.name} == {"results.csv", "summary.md", "report.html"}
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in (report.csv, report.markdown, report.html))


def test_csv_round_trips(report: ReportPaths) -> None:
    with report.csv.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    assert tuple(rows[0]) == COLUMNS
    failed = [r for r in rows if r["error"]]
    assert [(r["model"], r["prompt_id"], r["repeat"], r["error"], r["ttft_s"]) for r in failed] == [
        (DEEPSEEK, "p2", "1", ERROR, "")
    ]
    first = rows[0]
    assert (first["model"], first["ttft_s"], first["text"]) == (QWEN, "0.1", answer(QWEN, 0))
    assert rows[-1]["text"] == f"{LLAMA} answer 7: 长城"  # UTF-8


def columns(markdown: str) -> dict[str, int]:
    """The per-model table's column names and their positions."""
    header = [c.strip() for c in markdown.splitlines()[6].strip("|").split("|")]
    return {name: i for i, name in enumerate(header)}


def model_line(markdown: str, model: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {model} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_summary_markdown(report: ReportPaths) -> None:
    md = report.markdown.read_text(encoding="utf-8")
    col = columns(md)
    # (model, origin, ok/total, TTFT p50 ms, TPOT p50 ms, output tok/s, GPU $/1M, list $/1M, blended $/1M)
    # TTFT p50 of 8 values = mean of the 4th and 5th sorted; of deepseek's 7 successful ones = the 4th:
    #   qwen (0.160 + 0.180) / 2 = 170 ms; llama sorted .20 .25 .28 .30 .32 ... -> (0.30 + 0.32) / 2 = 310 ms;
    #   deepseek sorted .40 .45 .50 .55 .60 .65 .70 -> 550 ms.
    # GPU basis: tokens / 72 s window; $/h / (tok/s x 3600) x 1e6:
    #   qwen 8 x 90 = 720 tokens -> 10 tok/s; 2 x $1.8 = $3.6/h -> 3.6 / 36000 x 1e6 = $100.00
    #   deepseek 7 x 100 = 700 tokens (the failed call made none); $2/h x 72 s = $0.04 -> 0.04 / 700 x 1e6 = $57.14
    #   llama 8 x 180 = 1440 tokens -> 20 tok/s; $1.8/h -> 1.8 / 72000 x 1e6 = $25.00
    # list: qwen $2 output, blended (3 x 0.5 + 2) / 4 = 0.875; llama 0.6, (3 x 0.2 + 0.6) / 4 = 0.3; deepseek none
    expected = {
        QWEN: ("CN", "8/8", "170.0", "20.0", "50.0", "100.00", "2.00", "0.875"),
        DEEPSEEK: ("CN", "7/8", "550.0", "25.0", "40.0", "57.14", "\u2013", "\u2013"),
        LLAMA: ("US", "8/8", "310.0", "10.0", "100.0", "25.00", "0.6", "0.3"),
    }
    names = ("origin", "calls ok/total", "TTFT p50 ms", "TPOT p50 ms", "output tok/s", "GPU $/1M out",
             "list $/1M out", "blended $/1M")  # fmt: skip
    for model, values in expected.items():
        cells = model_line(md, model)
        assert tuple(cells[col[n]] for n in names) == values, model
    assert model_line(md, QWEN)[col["TTFT p90 ms"]] == "226.0"  # position 0.9 x 7 = 6.3: 220 + 0.3 x 20
    assert model_line(md, DEEPSEEK)[col["completion tokens"]] == "700"
    # CN pools 1420 tokens: ($0.072 + $0.04) / 1420 x 1e6 = $78.87; a list price is missing for deepseek
    cn = model_line(md, "CN")
    group = {name: i - 1 for name, i in col.items()}  # an origin row leads with two cells, a model's with three
    assert (cn[1], cn[2], cn[group["GPU $/1M out"]], cn[group["list $/1M out"]]) == (
        f"{QWEN}, {DEEPSEEK}",
        "15/16",
        "78.87",
        "\u2013",
    )
    assert model_line(md, "US")[group["GPU $/1M out"]] == "25.00"
    # llama is the only US model, hence the default baseline; every qwen TTFT is below llama's, every deepseek one above
    assert f"{QWEN} is " in md and f"% faster than {LLAMA} in TTFT on the same 4 prompts, 8 paired calls" in md
    assert f"% slower than {LLAMA} in TTFT on the same 4 prompts, 7 paired calls" in md  # the failed call drops out
    assert md.count(f"than {LLAMA}") + md.count(f"and {LLAMA}") + md.count(f"with {LLAMA}") == 8  # 2 models x 4


def test_html_sections_plots_and_escaping(report: ReportPaths) -> None:
    page = report.html.read_text(encoding="utf-8")
    assert "<title>Tiny &lt;models&gt;</title>" in page and "2025-01-02 03:04:00 UTC" in page
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    sections = re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", page, re.S)
    plots = {h: body.count("<svg") for h, body in sections}
    assert plots["TTFT distribution"] == plots["TPOT distribution"] == plots["Output speed"] == 1
    assert plots["Cost per 1M output tokens"] == 2  # GPU-time and list-price basis
    assert "<td>CN</td>" in page and "<td>US</td>" in page
    assert "TPOT = (E2E - TTFT) / (completion tokens - 1)" in page and "x 3600" in page
    # answers: escaped, never live markup; the long one truncated with its length; the error shown in red
    assert "Hello &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; goodbye" in page
    assert "<script" not in page.lower()
    assert "(first 600 of 1200 chars)" in page and LONG not in page
    assert f'<span class="err">error: {ERROR.replace("<", "&lt;").replace(">", "&gt;")}</span>' in page
    # self-contained: no attribute or CSS that loads anything from the network
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"url\(|@import|<link|<iframe|<object", page, re.I)


def test_empty_report_says_no_data(tmp_path: Path) -> None:
    paths = write_report([], {}, tmp_path)
    page = paths.html.read_text(encoding="utf-8")
    assert page.count("no data") >= 8
    assert "<h2>Answers side by side</h2>" in page
    with paths.csv.open(encoding="utf-8", newline="") as f:
        assert list(csv.reader(f)) == [list(COLUMNS)]


def test_unknown_baseline_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="baseline 'gpt' has no results"):
        write_report(results(), CARDS, tmp_path, baseline="gpt")


# Model ids, families and origins come from the gateway's /v1/models (config or a remote server); answers and
# errors from the models. None of them may become markup, a Markdown structure or a spreadsheet formula.
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_FAMILY = "qwen | 3\n## injected heading\r\n![pixel](http://evil.example/p.png) a\\|b"
HOSTILE_ORIGIN = "<b>CN</b>"
FORMULA = '=HYPERLINK("http://x")'


def hostile_report(out: Path) -> ReportPaths:
    """The fixed run with qwen renamed to ``HOSTILE``, its card's family and origin hostile, its answers a formula."""
    rows = [
        replace(r, model=HOSTILE, family=HOSTILE_FAMILY, origin=HOSTILE_ORIGIN, text=FORMULA) if r.model == QWEN else r
        for r in results()
    ]
    card = CARDS[QWEN].model_copy(update={"id": HOSTILE, "family": HOSTILE_FAMILY, "origin": HOSTILE_ORIGIN})
    cards = {LLAMA: CARDS[LLAMA], DEEPSEEK: CARDS[DEEPSEEK], HOSTILE: card}
    return write_report(rows, cards, out, title="Tiny <models>", generated_at=datetime(2025, 1, 2, tzinfo=UTC))


def md_cells(line: str) -> list[str]:
    """A GitHub-flavoured table row's cells: a pipe after a backslash is text, every other pipe separates."""
    return [c.strip() for c in re.findall(r"(?:\\.|[^|\\])+", line.strip().removeprefix("|").removesuffix("|"))]


def md_text(cell: str) -> str:
    """What a Markdown renderer shows for a cell: backslash escapes and HTML entities resolved."""
    return html.unescape(re.sub(r"\\(.)", r"\1", cell))


def test_summary_markdown_escapes_model_family_and_origin(tmp_path: Path) -> None:
    md = hostile_report(tmp_path).markdown.read_text(encoding="utf-8")
    lines = md.splitlines()
    # no live HTML and no image or link syntax from the data; only our own headings
    assert "<img" not in md and "<b>" not in md
    assert "![pixel](" not in md and not re.search(r"(?<!\\)\]\(", md)  # a link needs an unescaped ](
    assert [x for x in lines if x.startswith("#")] == [
        "# Tiny &lt;models&gt;", "## Per model", "## Accuracy", "## Per character", "## By origin",
        "## Paired comparisons",
        "## How to read this",
    ]  # fmt: skip
    # the per-model table keeps one line per model and as many cells as its header in every line
    start = lines.index("## Per model") + 2
    table = lines[start : lines.index("", start)]
    assert len(table) == 2 + 3
    assert {len(md_cells(x)) for x in table} == {len(md_cells(table[0]))}
    row = next(md_cells(x) for x in table if md_text(md_cells(x)[0]) == HOSTILE)
    # the renderer shows the values themselves, line breaks as spaces
    assert (md_text(row[1]), md_text(row[2])) == (" ".join(HOSTILE_FAMILY.splitlines()), HOSTILE_ORIGIN)
    # every paired comparison is one list item on one line, naming the model as text
    items = [x for x in lines if x.startswith("- ")]
    assert len(items) == 8 and sum(1 for x in items if "&lt;img src=x onerror=alert(1)&gt;" in x) == 4


def test_csv_neutralises_formulas_and_keeps_numbers(tmp_path: Path) -> None:
    # OWASP's CSV injection list: a text cell starting with = + - @ tab or carriage return is run as a formula
    texts = [FORMULA, "+1+1", "-2+3", "@SUM(A1)", "\t=1+1", "\r=1+1", "1+1=2", "plain"]
    calls = [
        CallResult(
            comparison_id="run-1", kind="run", model="=cmd|' /C calc'!A0", prompt_id=f"-p{i}", repeat=i,
            family="@family", origin="+CN", ttft_s=0.1, cost_list_usd=-0.25, text=text, error=f"-ERR {i}",
            created_at=1000.0 + i,
        )
        for i, text in enumerate(texts)
    ]  # fmt: skip
    paths = write_report(calls, {}, tmp_path)
    with paths.csv.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == [f"'{t}" for t in texts[:6]] + texts[6:]
    assert {(r["model"], r["family"], r["origin"]) for r in rows} == {("'=cmd|' /C calc'!A0", "'@family", "'+CN")}
    assert [(r["prompt_id"], r["error"]) for r in rows[:2]] == [("'-p0", "'-ERR 0"), ("'-p1", "'-ERR 1")]
    # numbers we wrote stay numbers, a negative one included
    assert {(r["cost_list_usd"], r["ttft_s"]) for r in rows} == {("-0.25", "0.1")}
    assert [r["repeat"] for r in rows] == [str(i) for i in range(len(texts))]


def test_html_escapes_a_hostile_model_name_and_answer(tmp_path: Path) -> None:
    page = hostile_report(tmp_path).html.read_text(encoding="utf-8")
    name = html.escape(HOSTILE)
    assert "<img" not in page.lower() and not re.search(r"<[^>]*onerror", page, re.I)
    assert f"<td>{name}</td>" in page  # the summary table
    assert f"<th>{name}</th>" in page  # the answers' column
    assert f'text-anchor="end">{name}</text>' in page  # a plot's row label
    assert f"<td>{name} vs {LLAMA}</td>" in page  # paired comparisons
    assert f"<td>{html.escape(HOSTILE_ORIGIN)}</td>" in page and "<b>" not in page
    # a formula is only text in HTML: shown as written, its quotes escaped
    assert '<div class="ans">=HYPERLINK(&quot;http://x&quot;)</div>' in page


def test_reasoning_arms_time_to_first_answer_and_cost_per_answer(tmp_path: Path) -> None:
    """A thinking arm and its thinking-off variant against a US model: TTFAT, reasoning share, empty answers (flagged
    in the answers), $ per answer, reasoning shown collapsed, and paired comparisons on TTFAT."""
    rows = []
    for k in range(4):
        base = CallResult(comparison_id="run-r", kind="run", model=QWEN, prompt_id=f"p{k}", family="qwen3",
                          origin="CN", tpot_s=0.01, e2e_s=1.0, prompt_tokens=10, created_at=1000.0 + k)  # fmt: skip
        empty = k == 3
        rows.append(replace(base, ttft_s=0.05, ttfat_s=None if empty else 0.5, reasoning_s=0.45,
                            completion_tokens=100, reasoning_tokens=100 if empty else 80,
                            answer_tokens=0 if empty else 20, empty_answer=int(empty),
                            reasoning_text=f"thinking <{k}>", text="" if empty else "answer",
                            finish_reason="length" if empty else "stop", cost_list_usd=0.0002))  # fmt: skip
        rows.append(replace(base, variant="nothink", ttft_s=0.05, ttfat_s=0.05, completion_tokens=20,
                            answer_tokens=20, text="quick", cost_list_usd=0.00004))  # fmt: skip
        rows.append(replace(rows[-1], model=LLAMA, variant="", family="llama", origin="US", ttfat_s=0.1,
                            ttft_s=0.1, cost_list_usd=0.00002))  # fmt: skip
    paths = write_report(rows, CARDS, tmp_path)
    md = paths.markdown.read_text(encoding="utf-8")
    col = columns(md)
    think, nothink = model_line(md, QWEN), model_line(md, f"{QWEN}+nothink")
    assert think[col["TTFAT p50 ms"]] == "500.0" and nothink[col["TTFAT p50 ms"]] == "50.0"
    assert think[col["reasoning share"]] == "85%"  # (3 x 80 + 100) / 400
    assert think[col["empty answers"]] == "1" and nothink[col["empty answers"]] == "0"
    assert think[col["list $/answer"]] == "0.0002" and nothink[col["list $/answer"]] == "4e-05"
    assert f"{QWEN}+nothink is 50% faster than {LLAMA} in time to first answer token" in md
    assert f"{QWEN}: 1 of 4 successful calls ended with no answer" in md
    page = paths.html.read_text(encoding="utf-8")
    assert "<details><summary>reasoning (80 tokens, 12 chars)</summary>" in page
    assert "thinking &lt;0&gt;" in page  # escaped, like every text from a model
    assert "no answer: the thinking used the whole budget (finish_reason length)" in page
    with paths.csv.open(encoding="utf-8") as f:
        variants = [r["variant"] for r in csv.DictReader(f)]
    assert variants.count("nothink") == 4
