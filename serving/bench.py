"""Baseline figures of a local TorchServe for docs/serving.md; the command line is
`python -m scripts.bench_serving`.

    from serving import bench
    results = bench.measure(store, body, seconds=10, cold_runs=3, scratch=tmp)
    block = bench.render(results, command)

Figures:
  * cold start: `start` -> /ping answers, -> model registered (worker loaded), -> first prediction
    answered (median of `cold_runs` fresh servers);
  * for the archive's own batching settings and for batch_size 1: req/s, p50 and p99 latency with
    CLIENTS keep-alive clients (1 and 16), each for `seconds` of `wrk` (serving.wrk) on one PNG.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from serving import MODEL_NAME, wrk
from serving.client import Client
from serving.docblock import machine
from serving.properties import parse_properties
from serving.server import ANY_PORTS, Instance, start, stop
from serving.tsconfig import render as render_config
from serving.wrk import WrkResult

CLIENTS = (1, 16)
WARMUP_S = 2.0  # the JVM's JIT and the worker's first batches, before anything is timed
GOAL_P99_MS = 10.0  # issue 12's latency bound: p99 at 16 clients, and what defines a pod's capacity
REGISTER_TIMEOUT_S = 600.0  # a synchronous registration waits for workers to import torch (slow when busy)


def cold_start(instance: Instance, store: Path, body: bytes) -> dict[str, float]:
    """Seconds from `start` to: /ping healthy, model registered, first prediction answered."""
    t0 = time.perf_counter()
    start(instance, store, ANY_PORTS)
    try:
        ready = time.perf_counter() - t0
        client = Client.for_instance(instance)
        client.register()
        registered = time.perf_counter() - t0
        client.predict(body)
        first = time.perf_counter() - t0
        client.close()
    finally:
        stop(instance)
    return {"ready": ready, "registered": registered, "first_prediction": first}


def inference(client: Client) -> tuple[str, dict[str, str]]:
    """The prediction URL and the headers every benchmark request sends."""
    url = f"{client.urls['inference']}/predictions/{MODEL_NAME}"
    headers = {"Content-Type": "application/octet-stream"}
    if (key := client.key("inference")) is not None:  # None: token authorization is off
        headers["Authorization"] = f"Bearer {key}"
    return url, headers


@functools.cache
def _job_queue_size() -> int:
    return int(parse_properties(render_config("local"))["job_queue_size"])


def warm_up(
    url: str, headers: Mapping[str, str], body: bytes, clients: Sequence[int], seconds: float = WARMUP_S
) -> WrkResult:
    """Load a server for `seconds` before anything on it is timed (JVM JIT, a worker's first batches).

    With the most clients any figure will use, but no more than the shipped job queue holds: past
    it TorchServe refuses at once with 503, and the warm-up would only collect refusals. Every
    benchmark (bench, sweep, peers, container_load) warms up through here, so all warm up alike.
    """
    return wrk.run(url, headers, body, min(max(clients), _job_queue_size()), seconds)


def throughput(client: Client, body: bytes, seconds: float, clients: int) -> WrkResult:
    """wrk's closed-loop figures for `clients` keep-alive connections POSTing `body` for `seconds`."""
    url, headers = inference(client)
    return wrk.run(url, headers, body, clients, seconds)


def measure(store: Path, body: bytes, seconds: float, cold_runs: int, scratch: Path) -> dict[str, Any]:
    """Cold starts on fresh servers, then wrk figures per batching setting and client count."""
    instance = Instance("bench", scratch)
    runs = [cold_start(instance, store, body) for _ in range(cold_runs)]
    results: dict[str, Any] = {
        "machine": machine(), "seconds": seconds, "cold_runs": cold_runs, "wrk": wrk.version(),
        "cold": {key: statistics.median(run[key] for run in runs) for key in runs[0]}, "settings": {},
    }  # fmt: skip
    print(f"cold start: {results['cold']}")
    start(instance, store, ANY_PORTS)
    try:
        client = Client.for_instance(instance)
        for label, settings in (("archive", {}), ("batch 1", {"batch_size": 1, "max_batch_delay": 0})):
            client.register(**settings)
            described = client.describe()[0]
            name = (
                f"batchSize {described['batchSize']}, maxBatchDelay {described['maxBatchDelay']} ms, "
                f"{len(described['workers'])} worker"
                + (" (the archive's settings)" if label == "archive" else "")
            )
            warm_up(*inference(client), body, CLIENTS)
            figures = {clients: throughput(client, body, seconds, clients) for clients in CLIENTS}
            results["settings"][name] = figures
            print(f"{name}: " + "; ".join(f"{n} clients {r.to_json()}" for n, r in figures.items()))
            client.unregister()
        client.close()
    finally:
        stop(instance)
    return results


def render(results: dict[str, Any], command: str) -> str:
    """The figures for the bench_serving block of docs/serving.md."""
    cold = results["cold"]
    rows = "\n".join(
        f"| {name} | {r.connections} | {r.rps:.0f} req/s | {r.p50:.2f} ms | {r.p99:.2f} ms | {r.errors} |"
        for name, figures in results["settings"].items()
        for r in figures.values()
    )
    return f"""Measured on {time.strftime("%Y-%m-%d")} with `{command}`
on {results["machine"]}; TorchServe 0.12.0, 1 torch thread per worker, {results["wrk"]}.

Cold start (median of {results["cold_runs"]} fresh servers, seconds since `scripts.serve start`):

| JVM answers /ping | model registered (worker loaded) | first prediction answered |
|---|---|---|
| {cold["ready"]:.1f} s | {cold["registered"]:.1f} s | {cold["first_prediction"]:.1f} s |

Steady state (`wrk --latency`, keep-alive clients, {results["seconds"]:g} s per row, one PNG-encoded
28x28 test image):

| batching | clients | throughput | p50 latency | p99 latency | errors |
|---|---|---|---|---|---|
{rows}"""
