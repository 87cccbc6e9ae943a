"""Command line: ``gateway serve | emulate | up | compare | keygen`` (``python -m gateway`` is the same)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.config import ConfigError, ServeEnv, Settings, guess_card, load_settings, parse_settings
from gateway.devstack.supervisor import StartupError
from gateway.devstack.vllm_cpu import SetupError


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gateway")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", type=Path, help="YAML config file (see deploy/)")
    src.add_argument(
        "--backend",
        action="append",
        metavar="[NAME=]URL",
        help="a vLLM server whose models are discovered from its /v1/models (repeatable)",
    )
    p.add_argument("--host", help="address to listen on (default from config, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default from config, else 8000)")
    p.add_argument("--discover-timeout", type=float, default=60.0, help="seconds to wait for --backend servers")
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    p.add_argument(
        "--workers", type=int, default=1,
        help="worker processes sharing the port (metrics aggregated across them; limits and queues are per worker)",
    )  # fmt: skip


def _emulate_parser(sub: Any) -> None:
    p = sub.add_parser("emulate", help="run the vLLM emulator (a test double, not a model)")
    p.add_argument("--model", required=True, help="model name it answers to")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--ttft-ms", type=float, default=200.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--output-tokens", type=int, default=64, help="tokens per answer unless max_tokens is lower")
    p.add_argument("--jitter", type=float, default=0.0, help="relative jitter of every delay, 0-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="latency grows once more requests run than this")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered 500")
    p.add_argument("--stream-error-rate", type=float, default=0.0, help="fraction of streams with an error event")
    p.add_argument("--drop-rate", type=float, default=0.0, help="fraction of streams cut off mid-way")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="a Hugging Face tokenizer directory (tokenizer.json): real tokens; default: tokens are words",
    )
    p.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (off by default, as in vLLM)",
    )
    p.add_argument(
        "--reasoning-tokens",
        type=int,
        default=0,
        metavar="N",
        help="chat answers think first: N reasoning tokens, one per chunk at the ITL, counted against max_tokens",
    )
    p.add_argument(
        "--reasoning-field",
        choices=["reasoning", "reasoning_content"],
        default="reasoning",
        help="the delta/message field of the thinking (vLLM 0.32: reasoning; older servers: reasoning_content)",
    )
    p.add_argument(
        "--think-in-content",
        action="store_true",
        help="emulate a server without a reasoning parser: the thinking in the content, between <think> tags",
    )
    p.add_argument(
        "--answers",
        default=None,
        metavar="FILE.jsonl",
        help="a graded prompt file: its prompts are answered right with probability --accuracy (an oracle)",
    )
    p.add_argument(
        "--accuracy",
        type=float,
        default=1.0,
        metavar="P",
        help="with --answers: the chance (0-1) of the right answer, decided per prompt by --seed (default 1)",
    )
    p.add_argument(
        "--tool-error-rate",
        type=float,
        default=0.5,
        metavar="R",
        help="with --answers: the share (0-1) of wrong tool answers that are invalid calls; the rest are a wrong "
        "call or no call (default 0.5)",
    )


def _up_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="start backends + gateway (+ Prometheus) in one command; Ctrl-C stops everything")
    p.add_argument("--backends", choices=["emulated", "vllm-cpu"], default="emulated")
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--config", type=Path, help="config whose backends to start (default: the deploy/ example)")
    p.add_argument("--run-dir", type=Path, help="where logs and generated configs go (default: a temp dir)")
    p.add_argument(
        "--prometheus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start a Prometheus scraping everything (default: on for vllm-cpu, off for emulated)",
    )
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the built-in prompts to every model and print a table (default: on for vllm-cpu)",
    )


def _compare_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="run identical prompts against several models and write a report")
    p.add_argument(
        "--prompts", default="builtin",
        help="a JSONL file (prompt or messages per line, optionally expected + scorer), 'builtin' or 'builtin-graded'",
    )  # fmt: skip
    p.add_argument(
        "--format",
        default="jsonl",
        choices=("jsonl", "gsm8k", "mmlu-csv"),
        help="read --prompts as this public format (GSM8K question/answer JSONL, MMLU/CMMLU CSV)",
    )
    p.add_argument(
        "--cache-bust",
        action="store_true",
        help="a unique system message opens every call, so no prefix cache favours a model",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls per arm before the run, left out of the results (default 1)",
    )
    p.add_argument(
        "--models", default="all", help="comma-separated model ids or aliases (model+VARIANT for a variant), or 'all'"
    )
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME=JSON",
        help="request fields for an extra arm, e.g. nothink='{\"chat_template_kwargs\":{\"enable_thinking\":false}}';"
        " repeatable; applied to every model unless --models names arms as model+NAME",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="directory for report.html, results.csv, summary.md")
    p.add_argument("--gateway", default="http://127.0.0.1:8000", help="the gateway's URL")
    p.add_argument("--concurrency", type=int, default=1, help="calls in flight at once (default 1: no contention)")
    p.add_argument("--repeat", type=int, default=1, help="times each prompt is sent to each model")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens unless a prompt sets its own")
    p.add_argument("--baseline", help="model the others are compared with (default: the first US model)")
    p.add_argument("--judge", metavar="MODEL", help="a served model that compares each pair of answers, both orders")
    p.add_argument(
        "--api-key-env",
        default="GATEWAY_API_KEY",
        help="environment variable holding the gateway's API key, when it has keys on (default GATEWAY_API_KEY; "
        "never pass a key on the command line, where ps shows it)",
    )
    p.add_argument(
        "--results-db",
        metavar="URL_OR_PATH",
        help="also write the run's rows to this results store (a gateway's results_db: a postgresql://user@host/db "
        "URL without a password, or a SQLite file), so the run appears in the gateway's history",
    )
    p.add_argument(
        "--results-db-password-env",
        metavar="VAR",
        help="environment variable holding the --results-db PostgreSQL password (default: libpq's PGPASSWORD "
        "or ~/.pgpass)",
    )


def _keygen_parser(sub: Any) -> None:
    p = sub.add_parser("keygen", help="make a client API key; prints it once, and the config entry (its hash)")
    p.add_argument("--name", required=True, help="the key's name in logs and metrics (e.g. team-a)")
    p.add_argument("--models", help="comma-separated model ids or aliases it may use (default: all)")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--admin", action="store_true", help="may read /metrics and stored comparisons")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _emulate_parser(sub)
    _up_parser(sub)
    _compare_parser(sub)
    _keygen_parser(sub)
    return parser


def discover(backends: list[str], timeout: float) -> Settings:
    """Settings for ``serve --backend``: each server's models from its /v1/models, cards guessed from the id."""
    cards: dict[str, dict[str, Any]] = {}
    entries = []
    for i, spec in enumerate(backends):
        name, _, url = spec.rpartition("=") if "=" in spec.split("://")[0] else ("", "", spec)
        name = name or f"backend{i}"
        url = url.rstrip("/").removesuffix("/v1")
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = httpx.get(f"{url}/v1/models", timeout=5.0)
                response.raise_for_status()
                ids = [m["id"] for m in response.json()["data"]]
                break
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(f"--backend {spec}: cannot list models at {url}/v1/models: {exc}") from None
                time.sleep(1.0)
        for model in ids:
            cards.setdefault(model, guess_card(model).model_dump(exclude_none=True))
        entries.append({"name": name, "base_url": url, "models": ids})
    return parse_settings({"models": list(cards.values()), "backends": entries}, "--backend")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.server import server_options, tune_process

    env = ServeEnv()
    config = args.config or env.config
    if args.backend:
        settings = discover(args.backend, args.discover_timeout)
    elif config:
        settings = load_settings(config)
    else:
        print("error: gateway serve needs --config FILE or --backend URL", file=sys.stderr)
        return 2
    host = args.host or env.host or settings.gateway.host
    port = args.port if args.port is not None else (env.port or settings.gateway.port)
    logging.basicConfig(
        level=settings.gateway.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        return serve_workers(settings, host, port, args)
    app = create_app(settings)
    tune_process()
    uvicorn.Server(uvicorn.Config(app, **server_options(settings, host, port, access_log=args.access_log))).run()
    return 0


def serve_workers(settings: Settings, host: str, port: int, args: argparse.Namespace) -> int:
    """``--workers N``: uvicorn's process manager, each worker building the app from the settings passed in the
    environment, metrics in prometheus-client's multiprocess mode (a private directory, removed at exit)."""
    import os
    import shutil
    import tempfile

    import uvicorn

    from gateway.server import server_options

    if settings.gateway.metrics_port is not None:
        print("error: gateway.metrics_port is not supported with --workers > 1 (scrape the API port)", file=sys.stderr)
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["GATEWAY_SETTINGS_JSON"] = settings.model_dump_json()
    try:
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            workers=args.workers,
            **server_options(settings, host, port, access_log=args.access_log),
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def emulate(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.devstack.emulator import EmulatorConfig, create_emulator_app

    print(
        f"vLLM EMULATOR (not a model) answering as {args.model!r} on http://{args.host}:{args.port}",
        flush=True,
    )
    try:
        config = EmulatorConfig(
            model=args.model,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            output_tokens=args.output_tokens,
            jitter=args.jitter,
            seed=args.seed,
            batch_size=args.batch_size,
            max_model_len=args.max_model_len,
            fail_rate=args.fail_rate,
            stream_error_rate=args.stream_error_rate,
            drop_rate=args.drop_rate,
            tokenizer=args.tokenizer,
            tokenizer_info=args.enable_tokenizer_info_endpoint,
            reasoning_tokens=args.reasoning_tokens,
            reasoning_field=args.reasoning_field,
            think_in_content=args.think_in_content,
            answers=args.answers,
            accuracy=args.accuracy,
            tool_error_rate=args.tool_error_rate,
        )
        app = create_emulator_app(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    oracle = app.state.emulator.oracle
    if oracle is not None:
        print(f"oracle: {oracle.summary()} from {args.answers}, accuracy {args.accuracy}, seed {args.seed}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def up(args: argparse.Namespace) -> int:
    from gateway.devstack import stack

    kind = args.backends
    default = kind == "vllm-cpu"
    opts = stack.Options(
        kind=kind,
        config=args.config or stack.DEFAULT_CONFIG[kind],
        port=args.port,
        run_dir=args.run_dir,
        prometheus=default if args.prometheus is None else args.prometheus,
        prometheus_port=args.prometheus_port,
        compare=default if args.compare is None else args.compare,
    )
    return stack.up(opts)


def compare_run(args: argparse.Namespace) -> int:
    from gateway.compare import judge, report
    from gateway.compare import runs as compare
    from gateway.compare.arms import ArmError, arms, parse_variant_option
    from gateway.compare.store import SqliteStore, Store, open_store
    from gateway.errors import StoreUnavailable
    from gateway.state_urls import check_results_db

    url = args.gateway.rstrip("/").removesuffix("/v1")
    if args.concurrency < 1 or args.repeat < 1 or args.max_tokens < 1 or args.warmup < 0:
        print(
            "error: --concurrency, --repeat and --max-tokens must be at least 1, --warmup at least 0", file=sys.stderr
        )
        return 2
    shared: Store | None = None
    if args.results_db:  # opened before the run: a store that cannot be reached stops it before any call
        try:
            shared = open_store(check_results_db(args.results_db), password_env=args.results_db_password_env)
        except (ValueError, RuntimeError, StoreUnavailable) as exc:
            why = str(exc).replace("gateway.results_db_password_env", "--results-db-password-env")
            why = why.replace("gateway.results_db ", "--results-db ")
            print(f"error: {why if why.startswith('--') else f'--results-db: {why}'}", file=sys.stderr)
            return 2
    api_key = os.environ.get(args.api_key_env) or None
    try:
        prompts = compare.load_prompts(args.prompts, args.format)
        answer = httpx.get(f"{url}/v1/models", timeout=10, headers=compare.auth_headers(api_key))
        if answer.status_code == 401:
            why = f"refused the key in {args.api_key_env}" if api_key else f"needs an API key: set {args.api_key_env}"
            print(f"error: the gateway at {url} {why}", file=sys.stderr)
            return 2
        listed = answer.json()["data"]
    except compare.PromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"error: cannot list models at {url}/v1/models: {exc}", file=sys.stderr)
        return 1
    names = {m["id"]: m["id"] for m in listed} | {a: m["id"] for m in listed for a in m.get("aliases", [])}
    wanted = (
        list(dict.fromkeys(names.values())) if args.models == "all" else [m.strip() for m in args.models.split(",")]
    )
    try:
        variants = dict(parse_variant_option(option) for option in args.variant)
        models = arms(wanted, variants, names.get)
    except ArmError as exc:
        served = f"; the gateway serves {', '.join(sorted(names))}" if exc.unknown_model else ""
        print(f"error: {exc}{served}", file=sys.stderr)
        return 2
    judge_model = names.get(args.judge) if args.judge else None
    if args.judge and judge_model is None:
        print(
            f"error: --judge {args.judge}: not served; the gateway serves {', '.join(sorted(names))}", file=sys.stderr
        )
        return 2
    self_judged = judge_model in {arm.model for arm in models}
    if self_judged:
        print(f"note: the judge {judge_model} is also compared; {judge.SELF_JUDGING_NOTE}", file=sys.stderr)
    cards = compare.fetch_cards(url, api_key)
    total = len(models) * len(prompts) * args.repeat
    what = "arms" if variants else "models"
    print(f"{len(prompts)} prompts x {len(models)} {what} x {args.repeat} -> {total} calls via {url}", flush=True)
    results = compare.run(
        url, models, prompts, max_tokens=args.max_tokens, concurrency=args.concurrency, repeat=args.repeat,
        progress=compare.ProgressBar(), api_key=api_key, cache_bust=args.cache_bust, warmup=args.warmup,
    )  # fmt: skip
    compare.add_list_cost(results, cards)
    args.out.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(args.out / "results.sqlite")
    store.add(results)
    store.close()
    shared_failed = False
    if shared is not None:
        try:
            shared.add(results)
        except Exception as exc:  # the run's own files are still written
            print(f"error: --results-db: the rows were not written to {shared.where}: {exc}", file=sys.stderr)
            shared_failed = True
        finally:
            shared.close()
    judging = None
    if judge_model is not None:
        print(f"judging {len(judge.pairs(results))} pairs of answers with {judge_model}, both orders", flush=True)
        judgements = judge.judge_run(
            url, judge_model, results, {p.id: p.messages for p in prompts}, concurrency=args.concurrency,
            api_key=api_key,
        )  # fmt: skip
        judge.store_judgements(args.out / "results.sqlite", judgements)
        judging = judge.Judging(judge_model, judgements, self_judged)
    paths = report.write_report(results, cards, args.out, baseline=args.baseline, judging=judging)
    print()
    print(compare.table(results, cards))
    extra = ", judgements.csv" if judging else ""
    print(f"\nwrote {paths.html}, {paths.csv}, {paths.markdown}{extra} and {args.out / 'results.sqlite'}")
    if shared is not None and not shared_failed:
        print(f"and {len(results)} rows to {shared.where}")
    failed = sum(1 for r in results if r.error)
    return 1 if failed == len(results) or shared_failed else 0


def keygen(args: argparse.Namespace) -> int:
    import yaml

    from gateway.auth import hash_key, new_key

    key = new_key()
    entry: dict[str, Any] = {"name": args.name, "sha256": hash_key(key)}
    if args.models:
        entry["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for field in ("rpm", "tpm"):
        if getattr(args, field) is not None:
            entry[field] = getattr(args, field)
    if args.admin:
        entry["admin"] = True
    print(f"API key for {args.name} (shown once; give it to the client, keep only the hash):\n\n  {key}\n")
    print("Add under gateway.auth.keys in the config:\n")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "emulate":
            return emulate(args)
        if args.command == "compare":
            return compare_run(args)
        if args.command == "keygen":
            return keygen(args)
        return up(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StartupError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
