"""Measure what model monitoring costs: throughput at 16 clients with it on and off, side by side.

    python -m scripts.bench_monitoring                        # model_store/fashion_mnist.mar
    python -m scripts.bench_monitoring --rounds 5 --seconds 20

Starts its own TorchServe ("bench-monitoring", free loopback ports) once per run, with
FASHION_MONITORING=on or off in its environment (handler/monitor.py), registers the archive with its
own batching settings, warms it up and runs `wrk` with 16 keep-alive clients on a PNG test image.
On and off runs alternate for --rounds rounds, so a change in the machine's load hits both alike;
the medians and their ratio, with every run's figure and the exact command, replace the block between
the bench markers in docs/monitoring.md. Needs the archive, the processed test set (`python -m training.data`)
and `wrk` (Debian package wrk, `scripts/setup.sh --dev`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from handler.monitor import MONITORING_ENV, PREDICTIONS
from serving import MODEL_NAME, REPO, wrk
from serving.bench import WARMUP_S, throughput
from serving.client import Client
from serving.docblock import machine, write_block
from serving.images import encode as png
from serving.server import ANY_PORTS, Instance, ServeError, read_record, start, stop
from training.data import DataError, load_split

DOC = REPO / "docs" / "monitoring.md"
CLIENTS = 16


def one_run(store: Path, image: bytes, setting: str, seconds: float, scratch: Path) -> float:
    """Requests per second of a fresh server with monitoring `setting`; checks the setting took."""
    os.environ[MONITORING_ENV] = setting
    instance = Instance("bench-monitoring", scratch)
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
        raise SystemExit(f"{MONITORING_ENV}={setting} did not take: /metrics {state} {PREDICTIONS}")
    if result.errors:
        raise SystemExit(f"{result.errors} requests failed with monitoring {setting}; see the server log")
    return result.rps


def render(results: dict[str, Any], command: str) -> str:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_monitoring", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store")
    parser.add_argument(
        "--data", type=Path, default=REPO / "data", help="processed data (training.data --out)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="on/off pairs")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk run per server")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    try:
        wrk_version = wrk.version()
    except ServeError as err:
        raise SystemExit(f"error: {err}") from None
    if not (args.model_store / f"{MODEL_NAME}.mar").is_file():
        raise SystemExit(f"{args.model_store}/{MODEL_NAME}.mar not found: run `python -m archive.build`")
    try:
        image = png(load_split(args.data, "test").images[0].numpy())
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    command = shlex.join(
        ["python", "-m", "scripts.bench_monitoring", *(argv if argv is not None else sys.argv[1:])]
    )
    results: dict[str, Any] = {
        "machine": machine(), "seconds": args.seconds, "wrk": wrk_version, "on": [], "off": []
    }  # fmt: skip
    saved = os.environ.get(MONITORING_ENV)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as scratch:
            for round_ in range(args.rounds):
                # Alternate which setting goes first, so neither always runs on a warmer machine.
                for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                    rps = one_run(args.model_store, image, setting, args.seconds, Path(scratch))
                    results[setting].append(rps)
                    print(f"round {round_ + 1}: monitoring {setting}: {rps:.0f} req/s")
    except ServeError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if saved is None:
            os.environ.pop(MONITORING_ENV, None)
        else:
            os.environ[MONITORING_ENV] = saved
    write_block(args.doc, "bench_monitoring", render(results, command))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
