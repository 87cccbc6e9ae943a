"""``python -m loadtests run|sweep``: a locust run with the gateway cross-check, or a rate sweep with reports."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from loadtests import report
from loadtests.results import cross_check, read_stats
from loadtests.sweep import LOCUSTFILE, REPO, sweep


def _rates(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="step the open-loop rate per model until saturation or an SLO breach")
    s.add_argument("--host", required=True, help="the gateway's URL")
    s.add_argument("--models", required=True, help="comma-separated model ids")
    s.add_argument("--rates", type=_rates, default=[1.0, 2.0, 4.0, 8.0], help="comma-separated req/s")
    s.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    s.add_argument("--slo-ttft", type=float, default=0.0)
    s.add_argument("--slo-ttfat", type=float, default=0.0, help="SLO on time to first answer token, seconds")
    s.add_argument("--slo-tpot", type=float, default=0.0)
    s.add_argument("--arrival", choices=("constant", "poisson", "gamma"), default="poisson")
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="one locust run against the gateway, then client vs gateway /metrics")
    r.add_argument("--host", required=True)
    r.add_argument("--out", type=Path, help="CSV prefix directory (default: a temp dir)")
    r.add_argument("locust_args", nargs=argparse.REMAINDER, help="after --: arguments for locust")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        models = [m for m in args.models.split(",") if m]
        result = sweep(args.host, models, args.rates, args.duration, args.out, slo_ttft=args.slo_ttft,
                       slo_tpot=args.slo_tpot, slo_ttfat=args.slo_ttfat, arrival=args.arrival)  # fmt: skip
        report.write(result, args.out)
        print(report.markdown(result))
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="loadtest-"))
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.locust_args if a != "--"]
    before = httpx.get(f"{args.host}/metrics", timeout=10).text
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host, "--csv",
           str(out / "run"), "--only-summary", "--summary-json", str(out / "summary.json"), *extra]  # fmt: skip
    code = subprocess.run(cmd, cwd=REPO, check=False).returncode
    after = httpx.get(f"{args.host}/metrics", timeout=10).text
    stats = read_stats(out / "run")
    models = sorted(n.removeprefix("request ") for n in stats if n.startswith("request "))
    print("client / gateway over the same window:")
    for agreement in cross_check(stats, before, after, models):
        print("  " + agreement.line())
    print(f"CSV: {out / 'run'}_stats.csv")
    return code


if __name__ == "__main__":
    sys.exit(main())
