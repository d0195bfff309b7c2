"""Baseline figures of a local TorchServe for docs/serving.md; the command line is
`python -m scripts.bench_serving`.

    from serving import bench
    results = bench.measure(store, bodies, requests=1000, ab_requests=5000, cold_runs=3, scratch=tmp)
    block = bench.render(results, command)

Figures, each for the archive's own batching settings and for batch_size 1:
  * cold start: `start` -> /ping answers, -> model registered (worker loaded), -> first prediction
    answered (median of `cold_runs` fresh servers);
  * latency with 1 client: p50/p99 over `requests` sequential keep-alive POSTs of distinct bodies,
    timed in the client (loadgen.sequential_latency_ms);
  * throughput with 16 clients: `ab -k -c 16` on one body (ab: apache2-utils).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from serving import MODEL_NAME
from serving.client import Client
from serving.docblock import machine
from serving.loadgen import sequential_latency_ms
from serving.server import ANY_PORTS, Instance, ServeError, start, stop


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
    return url, {
        "Authorization": f"Bearer {client.key('inference')}",
        "Content-Type": "application/octet-stream",
    }


def ab_throughput(client: Client, body_file: Path, requests: int, clients: int = 16) -> dict[str, Any]:
    """`ab -k` requests per second and the failed requests (ab needs keep-alive here).

    ab's "Length" failures are not failures: it flags every body whose length differs from the
    first one's, and probabilities computed in different batches differ in their last digits.
    """
    url, headers = inference(client)
    command = [
        "ab", "-k", "-q", "-c", str(clients), "-n", str(requests),
        "-p", str(body_file), "-T", headers["Content-Type"],
        "-H", f"Authorization: {headers['Authorization']}", url,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests per second:\s+([\d.]+)", out)
    if rps is None:
        raise ServeError(f"ab printed no requests per second:\n{out[-1000:]}")
    kinds = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", out)
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    failed = sum(int(n) for n in kinds.groups()) if kinds else 0
    return {"rps": float(rps.group(1)), "failed": failed + (int(non_2xx.group(1)) if non_2xx else 0)}


def measure(
    store: Path, bodies: list[bytes], requests: int, ab_requests: int, cold_runs: int, scratch: Path
) -> dict[str, Any]:
    """Cold starts on fresh servers, then latency and throughput per batching setting."""
    instance = Instance("bench", scratch)
    runs = [cold_start(instance, store, bodies[0]) for _ in range(cold_runs)]
    results: dict[str, Any] = {
        "machine": machine(), "requests": requests, "ab_requests": ab_requests, "cold_runs": cold_runs,
        "cold": {key: statistics.median(run[key] for run in runs) for key in runs[0]}, "settings": {},
    }  # fmt: skip
    print(f"cold start: {results['cold']}")
    body_file = scratch / "image.png"
    body_file.write_bytes(bodies[0])
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
            try:
                figures = sequential_latency_ms(*inference(client), bodies, requests)
            except RuntimeError as err:
                raise ServeError(str(err)) from None
            figures |= ab_throughput(client, body_file, ab_requests)
            results["settings"][name] = figures
            print(f"{name}: {figures}")
            client.unregister()
        client.close()
    finally:
        stop(instance)
    return results


def render(results: dict[str, Any], command: str) -> str:
    """The figures for the bench_serving block of docs/serving.md."""
    cold = results["cold"]
    rows = "\n".join(
        f"| {name} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['rps']:.0f} req/s | {r['failed']} |"
        for name, r in results["settings"].items()
    )
    return f"""Measured on {time.strftime("%Y-%m-%d")} with `{command}`
on {results["machine"]}; TorchServe 0.12.0, 1 torch thread per worker.

Cold start (median of {results["cold_runs"]} fresh servers, seconds since `scripts.serve start`):

| JVM answers /ping | model registered (worker loaded) | first prediction answered |
|---|---|---|
| {cold["ready"]:.1f} s | {cold["registered"]:.1f} s | {cold["first_prediction"]:.1f} s |

Steady state ({results["requests"]} sequential requests for latency, `ab -k -c 16 -n {results["ab_requests"]}`
for throughput; PNG-encoded 28x28 test images):

| batching | p50 latency, 1 client | p99 latency, 1 client | throughput, 16 clients | failed |
|---|---|---|---|---|
{rows}"""
