"""What model monitoring costs: throughput at 16 clients with it on and off, on fresh servers.

    .venv/bin/python -m scripts.bench_monitoring          # the command line; writes docs/monitoring.md

    from monitoring import overhead
    results = overhead.compare(store, png_bytes, rounds=3, seconds=10.0, scratch=tmp)
    block = overhead.render(results, command)

Each run starts its own TorchServe ("bench-monitoring", free loopback ports) with
FASHION_MONITORING=on or off in its environment (handler/monitor.py), registers the archive with
its own batching settings, warms it up and runs `wrk` with 16 keep-alive clients on one image. On and off runs
alternate, so a change in the machine's load hits both alike.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from handler.monitor import MONITORING_ENV, PREDICTIONS
from serving import wrk
from serving.bench import WARMUP_S, throughput
from serving.client import Client
from serving.docblock import machine
from serving.server import ANY_PORTS, Instance, ServeError, read_record, start, stop

CLIENTS = 16


@contextmanager
def monitoring_env(setting: str) -> Iterator[None]:
    """FASHION_MONITORING=`setting` for the servers started inside; the old value restored after."""
    saved = os.environ.get(MONITORING_ENV)
    os.environ[MONITORING_ENV] = setting
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(MONITORING_ENV, None)
        else:
            os.environ[MONITORING_ENV] = saved


def one_run(store: Path, image: bytes, setting: str, seconds: float, scratch: Path) -> float:
    """Requests per second of a fresh server with monitoring `setting`. Raises ServeError if the
    setting did not take or a request failed."""
    instance = Instance("bench-monitoring", scratch)
    with monitoring_env(setting):
        start(instance, store, ANY_PORTS)
    try:
        client = Client.for_instance(instance)
        client.register()
        throughput(client, image, WARMUP_S, CLIENTS)  # warm-up: JIT profiling, JVM, connection pools
        result = throughput(client, image, seconds, CLIENTS)
        metrics = requests.get(f"{read_record(instance).url('metrics')}/metrics", timeout=10).text
        client.close()
    finally:
        stop(instance)
    if (f"{PREDICTIONS}{{" in metrics) != (setting == "on"):  # samples, not just the declared family
        state = "lacks" if setting == "on" else "has"
        raise ServeError(f"{MONITORING_ENV}={setting} did not take: /metrics {state} {PREDICTIONS}")
    if result.errors:
        raise ServeError(f"{result.errors} requests failed with monitoring {setting}; see the server log")
    return result.rps


def compare(store: Path, image: bytes, rounds: int, seconds: float, scratch: Path) -> dict[str, Any]:
    """`rounds` on/off pairs of `one_run`, alternating which goes first, each printed as it comes."""
    results: dict[str, Any] = {
        "machine": machine(), "seconds": seconds, "wrk": wrk.version(), "on": [], "off": []
    }  # fmt: skip
    for round_ in range(rounds):
        # Alternate which setting goes first, so neither always runs on a warmer machine.
        for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            rps = one_run(store, image, setting, seconds, scratch)
            results[setting].append(rps)
            print(f"round {round_ + 1}: monitoring {setting}: {rps:.0f} req/s")
    return results


def render(results: dict[str, Any], command: str) -> str:
    """The bench_monitoring block of docs/monitoring.md."""
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    runs = " | ".join(f"{a:.0f} / {b:.0f}" for a, b in zip(results["on"], results["off"], strict=True))
    return f"""Measured on {time.strftime("%Y-%m-%d")} with `{command}`
on {results["machine"]}; the archive's batching settings,
{results["wrk"]} with {CLIENTS} keep-alive clients for {results["seconds"]:g} s
on one PNG test image, on and off runs alternating on fresh servers.

| monitoring | throughput, {CLIENTS} clients (median of {len(results["on"])}) |
|---|---|
| on (default) | {on:.0f} req/s |
| off (`{MONITORING_ENV}=off`) | {off:.0f} req/s |
| cost | {(1 - on / off) * 100:.1f}% of throughput |

Every round, on / off req/s: {runs}."""
