"""``gateway up``: a whole local stack in one command (backends + gateway), stopped as one.

The backends come from a config file (``deploy/config.emulated.yaml`` by default): every backend is started
on a free local port, the gateway is started with the same config pointed at those ports, and the command
returns only when the user stops it (Ctrl-C, SIGTERM), after stopping every process it started.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.config import Settings, load_settings
from gateway.supervisor import Child, Supervisor, free_port, port_in_use, python, signals_as_keyboard_interrupt

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EMULATED_CONFIG = REPO / "deploy" / "config.emulated.yaml"


def emulator_argv(model: str, port: int, spec: dict[str, Any]) -> list[str]:
    argv = [python(), "-m", "gateway", "emulate", "--model", model, "--port", str(port)]
    for key, value in spec.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def relocate(settings: Settings, ports: dict[str, int], gateway_port: int) -> dict[str, Any]:
    """The settings as a plain dict, each backend moved to its local port."""
    data = settings.model_dump(mode="json", exclude_none=True)
    data["gateway"]["port"] = gateway_port
    for backend in data["backends"]:
        backend["base_url"] = f"http://127.0.0.1:{ports[backend['name']]}"
    return data


def up_emulated(config: Path, port: int, run_dir: Path | None = None) -> int:
    settings = load_settings(config)
    if port_in_use(port):
        print(f"error: port {port} is already in use; pick another with --port")
        return 2
    run = run_dir or Path(tempfile.mkdtemp(prefix="gateway-up-"))
    sup = Supervisor(run / "logs")
    with signals_as_keyboard_interrupt():
        try:
            ports = {b.name: free_port() for b in settings.backends}
            print(
                f"Starting {len(settings.backends)} emulated vLLM backends (emulators, not models) ...",
                flush=True,
            )
            children: list[Child] = []
            for backend in settings.backends:
                spec = (backend.emulator.model_dump() if backend.emulator else {}) | {"seed": len(children)}
                argv = emulator_argv(backend.models[0], ports[backend.name], spec)
                children.append(sup.start(f"emulator-{backend.name}", argv))
            for backend, child in zip(settings.backends, children, strict=True):
                sup.wait_ready(child, f"http://127.0.0.1:{ports[backend.name]}/health", timeout=30)
                print(f"  {backend.name:<14} {backend.models[0]:<28} http://127.0.0.1:{ports[backend.name]}")
            config_out = run / "gateway.yaml"
            config_out.write_text(yaml.safe_dump(relocate(settings, ports, port), sort_keys=False))
            gateway = sup.start(
                "gateway",
                [python(), "-m", "gateway", "serve", "--config", str(config_out), "--port", str(port)],
            )
            url = f"http://127.0.0.1:{port}"
            sup.wait_ready(gateway, f"{url}/ready", timeout=30)
            models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
            print(f"\nGateway ready at {url}/v1  (models: {', '.join(models)})")
            print(f"Metrics at {url}/metrics; logs in {run / 'logs'}. Press Ctrl-C to stop.", flush=True)
            while True:
                for child in sup.children:
                    if child.process.poll() is not None:
                        print(f"error: {child.name} exited with code {child.process.returncode}:\n{child.tail()}")
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nStopping ...", flush=True)
            return 0
        finally:
            sup.stop()
            print("All processes stopped.", flush=True)
