"""Comparison report: ``results.csv``, ``summary.md`` and one self-contained ``report.html`` (standard library only).

Contract:

- Input: CallResults and the model cards by model id. What is compared is an *arm*: a model, or a model with a
  named variant of the request (``model+variant``, e.g. thinking off); arms are listed in the order they first
  appear in the results; an arm without a card shows the family and origin its results recorded, and no prices.
- Latency, token and speed figures use successful calls only (``error is None``); "calls ok/total" counts all.
- "output tok/s" is 1 / median TPOT: the speed one user sees (docs/measurement.md, "output speed").
- GPU-time basis: $/1M output tokens = ``cost.gpu_usd_per_1m_output(card GPUs x $/GPU-hour, served tok/s)``, where
  served tok/s = sum of completion tokens of the model's successful calls / its active window, from its earliest
  call's ``created_at`` to the latest ``created_at + e2e_s``. This is the rate the model actually served in the run,
  not one request's speed: with continuous batching requests share the GPUs.
- List-price basis: the card's output $/1M; blended = ``cost.blended_price_per_1m``. A missing price shows a dash.
- Origin groups (CN and US always, other origins when present) pool their models' calls; a group's $/1M is the
  token-weighted mean of its models' $/1M (= the group's total $ / its total output tokens), a dash if one is missing.
- Paired comparisons (``gateway.compare.stats``): every arm against the baseline (default: the first US model,
  else the first arm) on TTFT, TPOT, E2E and output speed, and on time to first answer token when any call
  reasoned.
- Accuracy (``gateway.compare.quality``): for graded prompts, accuracy per arm and per origin with a Wilson 95%
  interval, per category and language, paired against the baseline with McNemar's exact test, $ per correct
  answer on both bases, and accuracy against $ per answer and against TTFAT with the Pareto front marked.
- Reasoning: TTFAT is the time to the first answer chunk (not reasoning); reasoning share = reasoning tokens /
  completion tokens; "empty answers" counts successful calls with no answer (thinking used the whole max_tokens),
  which the answers section flags. $ per answer = the whole call's cost, thinking included: on the list-price
  basis the mean cost of a successful call, on the GPU-time basis $/1M x its mean completion tokens.
- report.html has inline CSS and SVG drawn here; no script and nothing fetched. Every text that comes from results
  or cards is HTML-escaped. Every section is always present and says "no data" when it has none.
- Model ids, families, origins, answers and errors come from config, a remote gateway or a model: untrusted.
  summary.md HTML-escapes them, backslash-escapes what would make a link, an image or a table cell, and writes line
  breaks as spaces. results.csv prefixes ``'`` to a text cell starting with ``= + - @``, tab or CR, which a
  spreadsheet would run as a formula (OWASP); numbers are written as numbers.
"""

from __future__ import annotations

import csv
import html
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.compare import judge, quality
from gateway.compare.answers import answers, table
from gateway.compare.charts import bar_chart, escape_html, strip_plot
from gateway.compare.stats import (
    DASH,
    METRIC_LABELS,
    METRICS,
    Paired,
    Summary,
    describe,
    format_ratio,
    paired,
)
from gateway.compare.stats import summary as summarize
from gateway.compare.store import COLUMNS, CallResult
from gateway.config import ModelCard
from gateway.cost import blended_price_per_1m, gpu_usd_per_1m_output

MISSING = DASH
DEFAULT_TITLE = "Model comparison"
MAIN_ORIGINS = ("CN", "US")
NO_DATA = '<p class="nodata">no data</p>'
GPU_NOTE = (
    "GPU-time basis: $/1M output tokens = (GPUs x $/GPU-hour) / (output tokens/s x 3600) x 10^6, using the rate "
    "each model actually served in this run: the sum of its successful calls' completion tokens divided by its "
    "active window (its first call's start to its last call's end). List-price basis: the model card's $ per 1M "
    "output tokens; blended = (3 x input + 1 x output) / 4."
)
DEFINITIONS = (
    "TTFT: time from the request to the first chunk carrying a token, reasoning included (role-only chunks do not "
    "count). TTFAT (time to first answer token): to the first chunk of the answer itself, after any thinking. "
    "Reasoning share: reasoning tokens / completion tokens. $/answer: what one call costs, thinking included. "
    "TPOT = (E2E - TTFT) / (completion tokens - 1). E2E: to the last token-bearing chunk. "
    "Output tok/s = 1 / median TPOT, the speed one user sees. Paired comparisons pair the same prompt and repeat "
    "on both models and report the median of the per-prompt ratios with a 95% bootstrap confidence interval; "
    "a ratio below 1 means a shorter time (or, for output speed, a lower speed)."
)


@dataclass(frozen=True, slots=True)
class ReportPaths:
    csv: Path
    markdown: Path
    html: Path


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a summary table: a model, or an origin group (then ``family`` lists its models)."""

    name: str
    family: str
    origin: str
    ok: int
    total: int
    ttft: Summary | None
    tpot: Summary | None
    prompt_tokens: int
    completion_tokens: int
    served_tps: float | None
    gpu_per_1m: float | None
    list_per_1m: float | None
    blended_per_1m: float | None
    ttfat: Summary | None = None
    reasoning_tokens: int = 0
    empty_answers: int = 0
    list_per_answer: float | None = None

    @property
    def reasoning_share(self) -> float | None:
        return self.reasoning_tokens / self.completion_tokens if self.completion_tokens else None

    @property
    def gpu_per_answer(self) -> float | None:
        if self.gpu_per_1m is None or not self.ok:
            return None
        return self.gpu_per_1m * self.completion_tokens / self.ok / 1e6

    @property
    def output_tps(self) -> float | None:
        return 1.0 / self.tpot.p50 if self.tpot and self.tpot.p50 > 0 else None


@dataclass(frozen=True, slots=True)
class Comparison:
    model: str
    baseline: str
    metric: str
    paired: Paired | None
    sentence: str


def served_rate(calls: Sequence[CallResult]) -> float | None:
    """Output tokens per second a model served over its active window; None without a window."""
    if not calls:
        return None
    start = min(c.created_at for c in calls)
    end = max(c.created_at + (c.e2e_s or 0.0) for c in calls)
    tokens = sum(c.completion_tokens for c in calls if c.error is None)
    return tokens / (end - start) if end > start else None


def _by_model(results: Iterable[CallResult]) -> dict[str, list[CallResult]]:
    """The results of each arm (a model, or model+variant), in the order the arms first appear."""
    out: dict[str, list[CallResult]] = {}
    for r in results:
        out.setdefault(r.arm, []).append(r)
    return out


def _summary_of(calls: Sequence[CallResult], metric: str) -> Summary | None:
    values = [v for c in calls if c.error is None and (v := getattr(c, metric)) is not None]
    return summarize(values) if values else None


def _row(name: str, family: str, origin: str, calls: Sequence[CallResult], prices: Sequence[float | None]) -> Row:
    good = [c for c in calls if c.error is None]
    listed = [c.cost_list_usd for c in good]
    per_answer = sum(x for x in listed if x is not None) / len(good) if good and None not in listed else None
    gpu, listed_1m, blended = prices
    return Row(
        name, family, origin, len(good), len(calls), _summary_of(calls, "ttft_s"), _summary_of(calls, "tpot_s"),
        sum(c.prompt_tokens for c in good), sum(c.completion_tokens for c in good), served_rate(calls), gpu,
        listed_1m, blended, ttfat=_summary_of(calls, "ttfat_s"), reasoning_tokens=sum(c.reasoning_tokens for c in good),
        empty_answers=sum(c.empty_answer for c in good), list_per_answer=per_answer,
    )  # fmt: skip


def model_rows(results: Sequence[CallResult], cards: Mapping[str, ModelCard]) -> list[Row]:
    rows = []
    for model, calls in _by_model(results).items():
        card = cards.get(calls[0].model)
        rate = served_rate(calls)
        gpu = gpu_usd_per_1m_output(card.gpu.cost_per_hour_usd, rate) if card and card.gpu and rate else None
        price = card.list_price if card else None
        family = card.family if card else (calls[0].family or "unknown")
        origin = card.origin if card else (calls[0].origin or "unknown")
        prices = (gpu, price.output_per_1m if price else None, blended_price_per_1m(price) if price else None)
        rows.append(_row(model, family, origin, calls, prices))
    return rows


def _weighted(rows: Sequence[Row], price: Callable[[Row], float | None]) -> float | None:
    # Weighting each model's $/1M by its tokens gives the group's total $ over its total tokens.
    values = [price(r) for r in rows]
    tokens = sum(r.completion_tokens for r in rows)
    if not rows or tokens == 0 or any(v is None for v in values):
        return None
    return sum((v or 0.0) * r.completion_tokens for v, r in zip(values, rows, strict=True)) / tokens


def origin_rows(results: Sequence[CallResult], rows: Sequence[Row]) -> list[Row]:
    origins = list(dict.fromkeys([*MAIN_ORIGINS, *(r.origin for r in rows)]))
    out = []
    for origin in origins:
        members = [r for r in rows if r.origin == origin]
        names = {r.name for r in members}
        calls = [c for c in results if c.arm in names]
        prices = [_weighted(members, lambda r: r.gpu_per_1m), _weighted(members, lambda r: r.list_per_1m)]
        prices.append(_weighted(members, lambda r: r.blended_per_1m))
        out.append(_row(origin, ", ".join(r.name for r in members) or "no data", origin, calls, prices))
    return out


def choose_baseline(rows: Sequence[Row], baseline: str | None) -> str | None:
    names = [r.name for r in rows]
    if baseline is not None and baseline not in names:
        raise ValueError(f"baseline {baseline!r} has no results; models with results: {', '.join(names) or 'none'}")
    return baseline or next((r.name for r in rows if r.origin == "US"), names[0] if names else None)


def comparisons(results: Sequence[CallResult], rows: Sequence[Row], baseline: str | None) -> list[Comparison]:
    base = choose_baseline(rows, baseline)
    by_model = _by_model(results)
    reasoned = any(r.reasoning_tokens or r.think_in_content for r in results)
    metrics = [m for m in METRICS if m != "ttfat_s" or reasoned]  # without thinking, TTFAT is TTFT
    out = []
    for row in rows:
        if base is None or row.name == base:
            continue
        for metric in metrics:
            p = paired(by_model[row.name], by_model[base], metric)
            out.append(Comparison(row.name, base, metric, p, describe(p, row.name, base, metric)))
    return out


# ---- formatting -------------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return MISSING if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _usd(value: float | None) -> str:
    # Cents are enough above $1; below it three significant digits keep $0.0556 from printing as 0.06.
    return MISSING if value is None else (f"{value:.2f}" if value >= 1 else f"{value:.3g}")


COLUMN_NAMES = (
    "calls ok/total", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "TTFAT p50 ms", "TPOT p50 ms", "output tok/s",
    "prompt tokens", "completion tokens", "reasoning share", "empty answers", "served tok/s", "GPU $/1M out",
    "list $/1M out", "blended $/1M", "GPU $/answer", "list $/answer",
)  # fmt: skip


def _pct_cell(share: float | None) -> str:
    return MISSING if share is None else f"{share * 100:.0f}%"


def _cells(row: Row) -> list[str]:
    t = row.ttft
    return [
        f"{row.ok}/{row.total}", _ms(t.p50 if t else None), _ms(t.p90 if t else None), _ms(t.p99 if t else None),
        _ms(row.ttfat.p50 if row.ttfat else None), _ms(row.tpot.p50 if row.tpot else None), _num(row.output_tps),
        str(row.prompt_tokens), str(row.completion_tokens), _pct_cell(row.reasoning_share), str(row.empty_answers),
        _num(row.served_tps), _usd(row.gpu_per_1m), _usd(row.list_per_1m), _usd(row.blended_per_1m),
        _usd(row.gpu_per_answer), _usd(row.list_per_answer),
    ]  # fmt: skip


def _lead_names(group: bool) -> list[str]:
    return ["origin", "models"] if group else ["model", "family", "origin"]


def _lead(row: Row, group: bool) -> list[str]:
    return [row.name, row.family] if group else [row.name, row.family, row.origin]


def _difference(c: Comparison, value: float) -> str:
    return f"{value:.1f} tok/s" if c.metric == "output_tps" else f"{value * 1000:.1f} ms"


# ---- files ------------------------------------------------------------------------------------------------------


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A value as results.csv writes it: text a spreadsheet would run as a formula gets a leading ``'``."""
    if value is None:
        return ""
    # Only text: a negative float we measured is a number, and a quote would turn it into text.
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(results: Sequence[CallResult], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in results:
            writer.writerow([csv_cell(getattr(r, c)) for c in COLUMNS])


# A backslash first (it escapes the others); brackets make links and images, a pipe ends a table cell.
_MD_SPECIAL = re.compile(r"([\\\[\]|])")


def md_escape(text: str) -> str:
    """Text as Markdown shows it verbatim on one line: no HTML, link, image, table cell or line break of its own."""
    one_line = " ".join(text.splitlines())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def _md_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(md_escape(c) for c in cells) + " |"


def _md_table(rows: Sequence[Row], *, group: bool) -> list[str]:
    head = [*_lead_names(group), *COLUMN_NAMES]
    return [_md_line(head), _md_line("---" for _ in head), *(_md_line(_lead(r, group) + _cells(r)) for r in rows)]


def render_markdown(
    title: str, when: str, rows: Sequence[Row], groups: Sequence[Row], comps: Sequence[Comparison],
    accuracy: quality.Markdown | None = None, judged: judge.Section | None = None,
    per_char: Sequence[Sequence[str]] = (),
) -> str:  # fmt: skip
    lines = [f"# {md_escape(title)}", "", f"Generated {when}.", "", "## Per model", ""]
    lines += _md_table(rows, group=False) if rows else ["No data."]
    lines += ["", "## Accuracy", ""]
    if accuracy is not None and accuracy.table:
        head, *body = accuracy.table
        lines += [_md_line(head), _md_line("---" for _ in head), *(_md_line(r) for r in body), ""]
        lines += [f"- {md_escape(x)}" for x in accuracy.sentences]
    else:
        lines.append(md_escape(accuracy.note if accuracy is not None else quality.NO_GRADED))
    if per_char:
        lines += ["", "## Per character", "", _md_line(per_char[0]), _md_line("---" for _ in per_char[0])]
        lines += [_md_line(r) for r in per_char[1:]]
    lines += ["", "## By origin", "", *_md_table(groups, group=True), "", "## Paired comparisons", ""]
    lines += [f"- {md_escape(c.sentence)}" for c in comps] or ["No data (fewer than two models)."]
    if empty := [r for r in rows if r.empty_answers]:
        lines += ["", "## Empty answers", ""]
        lines += [f"- {md_escape(r.name)}: {r.empty_answers} of {r.ok} successful calls ended with no answer (the "
                  "thinking used the whole max_tokens)." for r in empty]  # fmt: skip
    if judged is not None:
        lines += ["", "## Pairwise judging", "", *(md_escape(s) + "\n" for s in judged.sentences)]
        for head, *body in judged.tables:
            lines += [_md_line(head), _md_line("---" for _ in head), *(_md_line(r) for r in body), ""]
    lines += ["", "## How to read this", "", DEFINITIONS, "", GPU_NOTE, ""]
    return "\n".join(lines)


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
td.n{text-align:right}th{background:#f3f3f3}.note{background:#f8f8f0;padding:.5em 1em;border-left:3px solid #cc9}
.err{color:#b00020}.nodata{fill:#888;color:#888}.ans{white-space:pre-wrap;max-width:40em}.len{color:#777}
svg.plot text{font-size:12px;fill:#333}.grid{stroke:#ddd}.box{fill:#cfe0f5;stroke:#5b8fd0}
.median{stroke:#123e7a;stroke-width:2}.dot{fill:#1f4e9a;fill-opacity:.55}.bar{fill:#5b8fd0}
.point{fill:#fff;stroke:#5b8fd0;stroke-width:2}.pareto{fill:#1f4e9a}
.front{fill:none;stroke:#1f4e9a;stroke-dasharray:4 3}"""


def _per_char_table(cells: Sequence[Sequence[str]]) -> str:
    head, *body = cells
    return table(head, [[escape_html(c) for c in row] for row in body], numeric_from=1) if body else NO_DATA


def _summary_table(rows: Sequence[Row], *, group: bool) -> str:
    if not rows:
        return NO_DATA
    body = [[escape_html(c) for c in _lead(r, group) + _cells(r)] for r in rows]
    return table([*_lead_names(group), *COLUMN_NAMES], body, numeric_from=len(_lead_names(group)))


def _comparison_section(comps: Sequence[Comparison]) -> str:
    if not comps:
        return '<p class="nodata">no data (fewer than two models)</p>'
    rows = []
    for c in comps:
        cells = [f"{c.model} vs {c.baseline}", METRIC_LABELS[c.metric], str(c.paired.n if c.paired else 0)]
        if c.paired:
            (r_lo, r_hi), (d_lo, d_hi) = c.paired.ratio_ci, c.paired.difference_ci
            cells += [format_ratio(c.paired.median_ratio), f"{format_ratio(r_lo)}{DASH}{format_ratio(r_hi)}"]
            cells += [_difference(c, c.paired.median_difference), f"{_difference(c, d_lo)} to {_difference(c, d_hi)}"]
        else:
            cells += [MISSING] * 4
        rows.append([escape_html(cell) for cell in cells])
    head = ["models", "metric", "pairs", "median ratio", "95% CI", "median difference", "95% CI"]
    sentences = "".join(f"<li>{escape_html(c.sentence)}</li>" for c in comps)
    return f"<ul>{sentences}</ul>" + table(head, rows, numeric_from=2)


def _cost_section(rows: Sequence[Row]) -> str:
    if not rows:
        return NO_DATA
    gpu, listed = [(r.name, r.gpu_per_1m) for r in rows], [(r.name, r.list_per_1m) for r in rows]
    return (
        f"<p>{escape_html(GPU_NOTE)}</p><h3>GPU-time basis</h3>"
        + bar_chart("$ per 1M output tokens, GPU-time basis", gpu, "$", lambda v: f"${_usd(v)}")
        + "<h3>List-price basis</h3>"
        + bar_chart("$ per 1M output tokens, list-price basis", listed, "$", lambda v: f"${_usd(v)}")
    )


def render_html(
    title: str, when: str, results: Sequence[CallResult], rows: Sequence[Row], groups: Sequence[Row],
    comps: Sequence[Comparison], accuracy: str = NO_DATA, judged: str | None = None,
) -> str:  # fmt: skip
    by_model = _by_model(results)
    models = [r.name for r in rows]

    def distribution(metric: str) -> str:
        series = [(m, [v * 1000 for c in by_model[m] if c.error is None and (v := getattr(c, metric)) is not None])
                  for m in models]  # fmt: skip
        return (
            strip_plot(f"{METRIC_LABELS[metric]} per model, every successful call", series, "ms") if rows else NO_DATA
        )

    speed = [(r.name, r.output_tps) for r in rows]
    sections = [
        (
            "How to read this",
            f'<div class="note"><p>{escape_html(DEFINITIONS)}</p><p>{escape_html(GPU_NOTE)}</p></div>',
        ),
        ("Summary", _summary_table(rows, group=False)),
        ("Accuracy", accuracy),
        ("Per character", _per_char_table(quality.per_character(_by_model(results), rows))),
        ("By origin: CN vs US", _summary_table(groups, group=True)),
        ("TTFT distribution", distribution("ttft_s")),
        ("Time to first answer token distribution", distribution("ttfat_s")),
        ("TPOT distribution", distribution("tpot_s")),
        ("Output speed", bar_chart("output tok/s = 1 / median TPOT", speed, "tok/s", _num) if rows else NO_DATA),
        ("Cost per 1M output tokens", _cost_section(rows)),
        ("Paired comparisons", _comparison_section(comps)),
        *([("Pairwise judging", judged)] if judged is not None else []),
        ("Answers side by side", answers(results, models)),
    ]
    body = "".join(f"<section><h2>{escape_html(h)}</h2>{content}</section>" for h, content in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape_html(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{escape_html(title)}</h1>"
        f"<p>Generated {escape_html(when)}; {len(results)} calls, "
        f"{len(rows)} models.</p>{body}</body></html>\n"
    )


def write_report(
    results: Sequence[CallResult],
    cards: Mapping[str, ModelCard],
    out_dir: Path,
    *,
    title: str = DEFAULT_TITLE,
    baseline: str | None = None,
    generated_at: datetime | None = None,
    judging: judge.Judging | None = None,
) -> ReportPaths:
    """Write results.csv, summary.md and report.html into ``out_dir`` (created if needed) and return their paths;
    with ``judging``, judgements.csv too and a pairwise-judging section (``gateway.compare.judge``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = model_rows(results, cards)
    groups = origin_rows(results, rows)
    comps = comparisons(results, rows, baseline)
    quality_html, quality_md = quality.section(_by_model(results), rows, groups, choose_baseline(rows, baseline))
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    paths = ReportPaths(out_dir / "results.csv", out_dir / "summary.md", out_dir / "report.html")
    write_csv(results, paths.csv)
    judged = judge.section(judging) if judging is not None else None
    if judging is not None:
        with (out_dir / "judgements.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([csv_cell(c) for c in row] for row in judge.csv_rows(judging.judgements))
    per_char = quality.per_character(_by_model(results), rows) if rows else []
    markdown = render_markdown(title, when, rows, groups, comps, quality_md, judged, per_char)
    paths.markdown.write_text(markdown, encoding="utf-8")
    page = render_html(title, when, results, rows, groups, comps, quality_html, judged.html if judged else None)
    paths.html.write_text(page, encoding="utf-8")
    return paths
