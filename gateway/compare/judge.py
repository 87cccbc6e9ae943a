"""Pairwise judging (``gateway compare --judge MODEL``): a model served by the gateway compares two arms' answers to
the same prompt, and the verdicts become win rates and Bradley-Terry strengths (docs/judging.md).

Contract:

- Pairs: for each (prompt, repeat), every unordered pair of arms that both answered (no error), in the run's arm
  order: ``arm_a`` is the one listed first. The answers are the stored ``text``, the answer without its reasoning.
- Each pair is judged twice, non-streaming at temperature 0: once with ``arm_a``'s answer as Answer A
  (``verdict_ab``) and once swapped (``verdict_ba``: there Answer A is ``arm_b``'s). Verdicts are positional, as
  the judge said them: ``A``, ``B``, ``tie``, or ``invalid`` (no verdict found, or the call failed).
- Outcome: ``a``/``b`` when both orders name the same arm, ``tie`` when both say tie, ``tie`` with
  ``order_disagreement`` when the orders differ (position bias, or a judge that cannot tell), ``invalid`` when
  either verdict is invalid. Invalid pairs are counted and shown, and left out of every score.
- Win rate of an arm = (wins + ties / 2) / its judged pairs, with a 95% percentile-bootstrap interval: the judged
  pairs resampled with replacement ``RESAMPLES`` times, ``random.Random(0)``.
- Bradley-Terry: P(i beats j) = p_i / (p_i + p_j). Fitted by the MM (Zermelo) iteration on the wins, a tie
  counting half a win each way; strengths normalised to a geometric mean of 1 (so 2.0 means twice the odds of
  an arm of average strength). The fit exists only if every arm has both won and lost, directly or through a
  chain (the win graph is strongly connected); when it is not, every pair of arms that met gets one extra tie,
  a weak prior that keeps strengths finite, and the section says so. The interval resamples as above.

Functions here do not import the report (``gateway.compare.report`` imports this module); report.py escapes and
writes what ``section`` and ``csv_rows`` return.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import httpx

from gateway.compare.answers import table
from gateway.compare.charts import escape_html
from gateway.compare.stats import CONFIDENCE, DASH, RESAMPLES, percentile
from gateway.compare.store import CallResult
from gateway.relay.sse import split_answer

Verdict = Literal["A", "B", "tie", "invalid"]
Outcome = Literal["a", "b", "tie", "invalid"]

JUDGE_MAX_TOKENS = 16  # room for the verdict on its own line; a judge that thinks first needs a non-thinking mode
JUDGE_PROMPT = """You are comparing two answers to the same prompt.

[Prompt]
{prompt}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Which answer better answers the prompt? Judge correctness first, then helpfulness and clarity. A good answer is \
in the language of the prompt. Do not let the order of the answers or their length decide.
Reply with exactly one of A, B or tie on the last line."""
SELF_JUDGING_NOTE = "a judge rating its own answers is biased towards them"


@dataclass(frozen=True, slots=True)
class Judgement:
    """One pair of arms on one (prompt, repeat), judged in both orders."""

    comparison_id: str
    prompt_id: str
    repeat: int
    arm_a: str
    arm_b: str
    verdict_ab: str  # the judge's verdict with arm_a's answer as Answer A
    verdict_ba: str  # ... and with arm_b's answer as Answer A
    judge: str
    reply_ab: str = ""  # the judge's replies as they came (or the call's error), for audit
    reply_ba: str = ""

    @property
    def outcome(self) -> Outcome:
        return combine(self.verdict_ab, self.verdict_ba)[0]

    @property
    def order_disagreement(self) -> bool:
        return combine(self.verdict_ab, self.verdict_ba)[1]


@dataclass(frozen=True, slots=True)
class Judging:
    """What the report shows: the judge and its judgements of one run."""

    judge: str
    judgements: list[Judgement]
    self_judged: bool = False


_DECORATION = re.compile(r"[*_`\"'.:!()\[\]{}<>]")
_VERDICTS: dict[str, Verdict] = {"a": "A", "b": "B", "tie": "tie"}
_LABEL = re.compile(r"^(final\s+)?(verdict|answer|winner|decision|better)\s*(is)?\s*", re.I)


def parse_verdict(reply: str | None) -> Verdict:
    """The verdict on the reply's last non-empty line (after any ``<think>`` block): the whole line, once markdown,
    punctuation and a label such as ``Verdict:`` are stripped, is ``A``, ``B`` or ``tie`` (any case); else the last
    standalone ``A``, ``B`` (capitals: a lower-case "a" is an article) or ``tie`` on that line; else invalid."""
    if not reply:
        return "invalid"
    lines = [line for line in split_answer(reply)[1].splitlines() if line.strip()]
    if not lines:
        return "invalid"
    last = _LABEL.sub("", _DECORATION.sub(" ", lines[-1]).strip()).strip()
    if last.lower() in _VERDICTS:
        return _VERDICTS[last.lower()]
    tokens = re.findall(r"\b(A|B|[Tt][Ii][Ee])\b", last)
    return _VERDICTS[tokens[-1].lower()] if tokens else "invalid"


_FIRST: dict[str, Outcome] = {"A": "a", "B": "b", "tie": "tie"}
_SWAPPED: dict[str, Outcome] = {"A": "b", "B": "a", "tie": "tie"}  # Answer A was arm_b's


def combine(verdict_ab: str, verdict_ba: str) -> tuple[Outcome, bool]:
    """(outcome, order disagreement) of the two orders' positional verdicts."""
    first, second = _FIRST.get(verdict_ab), _SWAPPED.get(verdict_ba)
    if first is None or second is None:
        return "invalid", False
    if first == second:
        return first, False
    return "tie", True


def user_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message (its text parts, when the content is a list)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def judge_prompt(prompt: str, answer_a: str, answer_b: str) -> str:
    return JUDGE_PROMPT.format(prompt=prompt, answer_a=answer_a, answer_b=answer_b)


def pairs(results: Sequence[CallResult]) -> list[tuple[CallResult, CallResult]]:
    """Every unordered pair of arms that both answered the same (prompt, repeat), arms in the run's order."""
    order = {arm: i for i, arm in enumerate(dict.fromkeys(r.arm for r in results))}
    by_key: dict[tuple[str, str, int], dict[str, CallResult]] = {}
    for r in results:
        if r.ok:
            by_key.setdefault((r.comparison_id, r.prompt_id, r.repeat), {}).setdefault(r.arm, r)
    out = []
    for answered in by_key.values():
        calls = sorted(answered.values(), key=lambda c: order[c.arm])
        out += list(itertools.combinations(calls, 2))
    return out


async def _ask(client: httpx.AsyncClient, url: str, judge: str, text: str) -> tuple[Verdict, str]:
    body = {"model": judge, "messages": [{"role": "user", "content": text}], "temperature": 0.0,
            "max_tokens": JUDGE_MAX_TOKENS, "stream": False}  # fmt: skip
    try:
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        if response.status_code != 200:
            return "invalid", f"error: HTTP {response.status_code}: {response.text[:200]}"
        reply = response.json()["choices"][0]["message"].get("content") or ""
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return "invalid", f"error: {type(exc).__name__}: {exc}"
    return parse_verdict(reply), str(reply)


async def judge_async(
    url: str, judge: str, results: Sequence[CallResult], prompts: Mapping[str, Sequence[Mapping[str, Any]]], *,
    concurrency: int = 1, api_key: str | None = None, progress: Callable[[int, int], None] | None = None,
) -> list[Judgement]:  # fmt: skip
    """Judge every pair (``pairs``) in both orders through the gateway at ``url``; ``prompts`` maps a prompt id to
    its messages. At most ``concurrency`` judge calls at once; judgements in the pairs' order."""
    todo = pairs(results)
    gate = asyncio.Semaphore(max(1, concurrency))
    timeout = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=300.0)
    limits = httpx.Limits(max_connections=max(1, concurrency) + 4)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    done = 0
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:

        async def ask(text: str) -> tuple[Verdict, str]:
            nonlocal done
            async with gate:
                answer = await _ask(client, url, judge, text)
            done += 1
            if progress:
                progress(done, 2 * len(todo))
            return answer

        async def one(a: CallResult, b: CallResult) -> Judgement:
            prompt = user_prompt(prompts.get(a.prompt_id, ()))
            (ab, reply_ab), (ba, reply_ba) = await asyncio.gather(
                ask(judge_prompt(prompt, a.text or "", b.text or "")),
                ask(judge_prompt(prompt, b.text or "", a.text or "")),
            )
            return Judgement(a.comparison_id, a.prompt_id, a.repeat, a.arm, b.arm, ab, ba, judge, reply_ab, reply_ba)

        return list(await asyncio.gather(*(one(a, b) for a, b in todo)))


def judge_run(url: str, judge: str, results: Sequence[CallResult],
              prompts: Mapping[str, Sequence[Mapping[str, Any]]], **kwargs: Any) -> list[Judgement]:  # fmt: skip
    return asyncio.run(judge_async(url, judge, results, prompts, **kwargs))


# -- statistics -----------------------------------------------------------------------------------------------------

Decided = tuple[str, str, Outcome]  # (arm_a, arm_b, outcome) of a valid judgement


def decided(judgements: Sequence[Judgement]) -> list[Decided]:
    return [(j.arm_a, j.arm_b, o) for j in judgements if (o := j.outcome) != "invalid"]


def win_rates(outcomes: Sequence[Decided]) -> dict[str, float]:
    """Each arm's (wins + ties / 2) / judged pairs."""
    points: dict[str, float] = {}
    played: dict[str, int] = {}
    for a, b, outcome in outcomes:
        share = {"a": 1.0, "b": 0.0, "tie": 0.5}[outcome]
        for arm, got in ((a, share), (b, 1.0 - share)):
            points[arm] = points.get(arm, 0.0) + got
            played[arm] = played.get(arm, 0) + 1
    return {arm: points[arm] / played[arm] for arm in played}


def _wins(outcomes: Sequence[Decided]) -> dict[tuple[str, str], float]:
    """wins[(i, j)]: how often i beat j, a tie counting half."""
    wins: dict[tuple[str, str], float] = {}
    for a, b, outcome in outcomes:
        share = {"a": 1.0, "b": 0.0, "tie": 0.5}[outcome]
        wins[(a, b)] = wins.get((a, b), 0.0) + share
        wins[(b, a)] = wins.get((b, a), 0.0) + 1.0 - share
    return wins


def _strongly_connected(arms: Sequence[str], wins: Mapping[tuple[str, str], float]) -> bool:
    """Whether every arm reaches every other along "beat at least once" edges."""

    def reach(start: str, edge: Callable[[str, str], float]) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            i = stack.pop()
            for j in arms:
                if j not in seen and edge(i, j) > 0:
                    seen.add(j)
                    stack.append(j)
        return seen

    forward = reach(arms[0], lambda i, j: wins.get((i, j), 0.0))
    backward = reach(arms[0], lambda i, j: wins.get((j, i), 0.0))
    return len(forward) == len(backward) == len(arms)


def bradley_terry(
    outcomes: Sequence[Decided], *, iterations: int = 1000, tol: float = 1e-10
) -> tuple[dict[str, float], bool]:
    """(strengths normalised to geometric mean 1, whether the prior tie was needed); see the module's contract."""
    wins = _wins(outcomes)
    arms = sorted({arm for pair in wins for arm in pair})
    if not arms:
        return {}, False
    prior = not _strongly_connected(arms, wins)
    if prior:
        for i, j in list(wins):
            wins[(i, j)] += 0.5
    total = {i: sum(w for (x, _), w in wins.items() if x == i) for i in arms}
    games = {(i, j): wins.get((i, j), 0.0) + wins.get((j, i), 0.0) for i in arms for j in arms if i != j}
    p = dict.fromkeys(arms, 1.0)
    for _ in range(iterations):
        new = {i: total[i] / sum(games[(i, j)] / (p[i] + p[j]) for j in arms if j != i and games[(i, j)])
               for i in arms}  # fmt: skip
        scale = math.exp(sum(math.log(v) for v in new.values()) / len(arms))
        new = {i: v / scale for i, v in new.items()}
        change = max(abs(math.log(new[i] / p[i])) for i in arms)
        p = new
        if change < tol:
            break
    return p, prior


@dataclass(frozen=True, slots=True)
class ArmScore:
    arm: str
    pairs: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    win_rate_ci: tuple[float, float]
    strength: float
    strength_ci: tuple[float, float]


@dataclass(frozen=True, slots=True)
class Scores:
    arms: list[ArmScore]  # strongest first
    prior: bool  # the Bradley-Terry fit needed the prior tie (some arm never won or never lost)


def _ci(values: Sequence[float], estimate: float) -> tuple[float, float]:
    if not values:
        return estimate, estimate
    tail = (1.0 - CONFIDENCE) / 2 * 100
    return percentile(values, tail), percentile(values, 100 - tail)


def scores(judgements: Sequence[Judgement], *, resamples: int = RESAMPLES, seed: int = 0) -> Scores | None:
    """Win rates and Bradley-Terry strengths with bootstrap intervals; None without two arms and a valid verdict."""
    outcomes = decided(judgements)
    rates = win_rates(outcomes)
    if len(rates) < 2:
        return None
    strengths, prior = bradley_terry(outcomes)
    rng = random.Random(seed)
    boot_rates: dict[str, list[float]] = {arm: [] for arm in rates}
    boot_strengths: dict[str, list[float]] = {arm: [] for arm in rates}
    n = len(outcomes)
    for _ in range(resamples):
        sample = [outcomes[rng.randrange(n)] for _ in range(n)]
        for arm, rate in win_rates(sample).items():
            boot_rates[arm].append(rate)
        fitted, _ = bradley_terry(sample, iterations=200, tol=1e-6)
        if len(fitted) == len(rates):  # an arm missing from the sample has no strength on this scale
            for arm, strength in fitted.items():
                boot_strengths[arm].append(strength)
    out = []
    for arm in rates:
        won = sum(1 for a, b, o in outcomes if (a == arm and o == "a") or (b == arm and o == "b"))
        tied = sum(1 for a, b, o in outcomes if arm in (a, b) and o == "tie")
        played = sum(1 for a, b, _ in outcomes if arm in (a, b))
        out.append(ArmScore(arm, played, won, tied, played - won - tied, rates[arm], _ci(boot_rates[arm], rates[arm]),
                            strengths[arm], _ci(boot_strengths[arm], strengths[arm])))  # fmt: skip
    out.sort(key=lambda s: (-s.strength, s.arm))
    return Scores(out, prior)


def head_to_head(judgements: Sequence[Judgement]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(wins, ties, losses) of the row arm against the column arm, valid judgements only."""
    table_: dict[tuple[str, str], list[int]] = {}
    for a, b, outcome in decided(judgements):
        slot = {"a": 0, "tie": 1, "b": 2}[outcome]
        table_.setdefault((a, b), [0, 0, 0])[slot] += 1
        table_.setdefault((b, a), [0, 0, 0])[2 - slot] += 1
    return {k: (v[0], v[1], v[2]) for k, v in table_.items()}


# -- output ---------------------------------------------------------------------------------------------------------

CSV_COLUMNS = ("comparison_id", "prompt_id", "repeat", "arm_a", "arm_b", "verdict_ab", "verdict_ba", "outcome",
               "order_disagreement", "judge")  # fmt: skip


def csv_rows(judgements: Sequence[Judgement]) -> list[list[object]]:
    """judgements.csv, header first."""
    rows: list[list[object]] = [list(CSV_COLUMNS)]
    for j in judgements:
        rows.append([j.comparison_id, j.prompt_id, j.repeat, j.arm_a, j.arm_b, j.verdict_ab, j.verdict_ba,
                     j.outcome, int(j.order_disagreement), j.judge])  # fmt: skip
    return rows


_STORED = tuple(f.name for f in fields(Judgement))


def store_judgements(path: Path | str, judgements: Sequence[Judgement]) -> None:
    """Add the judgements to a ``judgements`` table in the results SQLite file (created if missing), with the
    combined outcome and the judge's replies."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS judgements (id INTEGER PRIMARY KEY AUTOINCREMENT, comparison_id TEXT, "
            "prompt_id TEXT, repeat INTEGER, arm_a TEXT, arm_b TEXT, verdict_ab TEXT, verdict_ba TEXT, judge TEXT, "
            "reply_ab TEXT, reply_ba TEXT, outcome TEXT, order_disagreement INTEGER)"
        )
        rows = [(*astuple(j), j.outcome, int(j.order_disagreement)) for j in judgements]
        columns = ", ".join((*_STORED, "outcome", "order_disagreement"))
        db.execute("BEGIN IMMEDIATE")
        db.executemany(f"INSERT INTO judgements ({columns}) VALUES ({', '.join('?' * (len(_STORED) + 2))})", rows)
        db.execute("COMMIT")
    finally:
        db.close()


def _pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def _range(low: float, high: float, fmt: Callable[[float], str]) -> str:
    return f"{fmt(low)}{DASH}{fmt(high)}"


@dataclass(frozen=True, slots=True)
class Section:
    """The pairwise-judging section: its HTML, and for summary.md the sentences and tables (header row first) as
    plain text that the report escapes."""

    html: str
    sentences: list[str]
    tables: list[list[list[str]]]


def section(judging: Judging) -> Section:
    js = judging.judgements
    invalid = sum(1 for j in js if j.outcome == "invalid")
    disagreements = sum(1 for j in js if j.order_disagreement)
    sentences = [
        f"Judge: {judging.judge}. {len(js)} pairs of answers judged in both orders ({2 * len(js)} judge calls); "
        f"{disagreements} order disagreements counted as ties; {invalid} with an invalid verdict left out."
    ]
    if judging.self_judged:
        sentences.append(f"The judge is also one of the compared models: {SELF_JUDGING_NOTE}.")
    result = scores(js)
    if result is None:
        sentences.append("No data: pairwise judging needs two arms and at least one valid judgement.")
        body = "".join(f"<p>{escape_html(s)}</p>" for s in sentences)
        return Section(body, sentences, [])
    if result.prior:
        sentences.append("Some arm never won or never lost, so the Bradley-Terry fit added one tie to every pair "
                         "of arms that met (a weak prior that keeps the strengths finite).")  # fmt: skip
    head = ["arm", "pairs", "wins", "ties", "losses", "win rate", "95% CI", "BT strength", "95% CI"]
    rows = [
        [s.arm, str(s.pairs), str(s.wins), str(s.ties), str(s.losses), _pct(s.win_rate), _range(*s.win_rate_ci, _pct),
         f"{s.strength:.2f}", _range(*s.strength_ci, lambda v: f"{v:.2f}")]
        for s in result.arms
    ]  # fmt: skip
    arms = [s.arm for s in result.arms]
    h2h = head_to_head(js)
    cross = [["wins/ties/losses", *arms]] + [
        [row, *("/".join(map(str, h2h[(row, col)])) if (row, col) in h2h else DASH for col in arms)] for row in arms
    ]
    note = ("Win rate = (wins + ties / 2) / judged pairs. BT strength: Bradley-Terry, geometric mean 1; "
            "P(i beats j) = s_i / (s_i + s_j). Intervals: 95% bootstrap over the judged pairs. Rows of the "
            "pairwise table are the arm's wins/ties/losses against the column's arm.")  # fmt: skip
    sentences.append(note)
    escaped = [[escape_html(c) for c in r] for r in rows]
    cross_html = [[escape_html(c) for c in r] for r in cross[1:]]
    page = (
        "".join(f"<p>{escape_html(s)}</p>" for s in sentences) + table(head, escaped, numeric_from=1)
        + "<h3>Arm against arm</h3>" + table(cross[0], cross_html, numeric_from=1)
    )  # fmt: skip
    return Section(page, sentences, [[head, *rows], cross])
