"""A soak of a running TorchServe: ~80% of its measured capacity for N minutes, watching errors,
latency and memory. The command line, which starts its own server, is `python -m scripts.soak`.

    from serving import soak
    result = soak.soak(client, server.pid, bodies, minutes=5)     # the model must be registered
    block = soak.render(result, command, figure, doc)              # the docs/reliability.md block

1. capacity: `clients` keep-alive clients send back to back for `capacity_seconds`; the answered
   requests per second are the capacity (client and server share this machine's cores, so it is the
   capacity of this setup);
2. warm-up: the same clients send at a fixed total rate of `load` x capacity until the RSS of the
   JVM and of every worker has settled (within 2% over `STABLE_WINDOW` samples; at most `max_warmup_seconds`):
   growth is measured from then on, so first-touch of memory does not count as a leak;
3. soak: the same rate for `minutes`, open loop (loadgen.drive), latency counted from the due time;
4. memory: throughout, every `sample_seconds`, the RSS of the JVM and of each worker process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving import MODEL_NAME
from serving.client import Client
from serving.docblock import machine
from serving.loadgen import STABLE_WINDOW, MemoryTrace, Sample, drive, growth, record_memory


@dataclass
class SoakResult:
    clients: int
    load: float
    capacity_rps: float
    target_rps: float
    achieved_rps: float
    seconds: float
    warmup_s: float  # how long the load ran before the soak, until memory had settled
    warmup_settled: bool  # False: the warm-up hit its time limit first
    warmup_errors: int
    requests: int
    errors: int
    statuses: dict[str, int]
    latency_ms: dict[str, float]
    jvm: dict[str, float]
    workers: dict[str, dict[str, float]]
    workers_replaced: bool
    batching: str
    memory: dict[str, Any]  # seconds since the soak started (negative: warm-up) and MB

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.warmup_errors or self.workers_replaced)


def soak(
    client: Client,
    jvm_pid: int,
    bodies: Sequence[bytes],
    minutes: float,
    load: float = 0.8,
    clients: int = 16,
    capacity_seconds: float = 10.0,
    max_warmup_seconds: float = 120.0,
    sample_seconds: float = 1.0,
    progress: Callable[[str], None] = print,
) -> SoakResult:
    """Measure capacity; send `load` x capacity until memory has settled (at most `max_warmup_seconds`),
    then for `minutes` more: the soak. RSS is sampled throughout. The model must be registered."""
    url = f"{client.urls['inference']}/predictions/{MODEL_NAME}"
    headers = {"Authorization": f"Bearer {client.key('inference')}", "Content-Type": "image/png"}
    closed = drive(url, headers, bodies, clients, capacity_seconds)
    capacity = sum(s.status == 200 for s in closed) / capacity_seconds
    target = load * capacity
    progress(f"capacity {capacity:.0f} req/s with {clients} clients; warming up at {target:.0f} req/s")

    trace = MemoryTrace(jvm_pid)
    done, warm = threading.Event(), threading.Event()
    start = time.perf_counter()
    sampler = record_memory(trace, sample_seconds, done, start)
    try:
        warmup: list[Sample] = []
        loader = threading.Thread(
            target=drive,
            args=(url, headers, bodies, clients, max_warmup_seconds, target),
            kwargs={"stop": warm, "sink": warmup},
        )
        loader.start()
        while loader.is_alive() and not trace.settled():
            loader.join(sample_seconds)
        warm.set()
        loader.join()
        warmup_s, warmup_settled = time.perf_counter() - start, trace.settled()
        workers_before = {w["pid"] for v in client.describe() for w in v["workers"]}
        progress(f"memory {'settled' if warmup_settled else 'still moving'} after {warmup_s:.0f} s; soaking")
        seconds = minutes * 60
        samples = drive(url, headers, bodies, clients, seconds, rate=target)
    finally:
        done.set()
        sampler.join()
    trace.sample(time.perf_counter() - start)

    described = client.describe()[0]
    latencies = np.array([s.latency for s in samples]) * 1000
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    times = [t - warmup_s for t in trace.times]
    workers = {pid: [(t - warmup_s, mb) for t, mb in points] for pid, points in trace.workers.items()}
    return SoakResult(
        clients=clients,
        load=load,
        capacity_rps=capacity,
        target_rps=target,
        achieved_rps=sum(s.status == 200 for s in samples) / seconds,
        seconds=seconds,
        warmup_s=warmup_s,
        warmup_settled=warmup_settled,
        warmup_errors=sum(s.status != 200 for s in warmup),
        requests=len(samples),
        errors=sum(s.status != 200 for s in samples),
        statuses=statuses,
        latency_ms={
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
            "max": float(latencies.max()),
        },
        jvm=growth(list(zip(times, trace.jvm, strict=True)), 0.0),
        workers={str(pid): growth(points, 0.0) for pid, points in workers.items()},
        workers_replaced={w["pid"] for w in described["workers"]} != workers_before,
        batching=f"batchSize {described['batchSize']}, maxBatchDelay {described['maxBatchDelay']} ms, "
        f"{len(described['workers'])} worker(s)",
        memory={"times": times, "jvm_mb": trace.jvm, "workers_mb": {str(k): v for k, v in workers.items()}},
    )


def render(result: SoakResult, command: str, figure: Path, doc: Path) -> str:
    """The figures for the soak block of `doc`, with `command` and a link to `figure`."""
    workers = "; ".join(
        f"worker {pid}: {g['start_mb']:.0f} -> {g['end_mb']:.0f} MB ({g['growth_pct']:+.1f}%, "
        f"max {g['max_mb']:.0f})"
        for pid, g in result.workers.items()
        if g
    )
    jvm, lat = result.jvm, result.latency_ms
    settled = (
        f"RSS settled (within 2% over {STABLE_WINDOW} samples)"
        if result.warmup_settled
        else "RSS not settled (time limit)"
    )
    memory = (
        f"JVM {jvm['start_mb']:.0f} -> {jvm['end_mb']:.0f} MB ({jvm['growth_pct']:+.1f}%, "
        f"max {jvm['max_mb']:.0f}); {workers}"
    )
    link = os.path.relpath(figure, doc.parent)
    header = (
        f"| capacity ({result.clients} clients, closed loop) | soak rate ({result.load:.0%}) | achieved "
        "| duration | requests | errors | p50 | p99 | max |"
    )
    cells = [
        f"{result.capacity_rps:.0f} req/s",
        f"{result.target_rps:.0f} req/s",
        f"{result.achieved_rps:.0f} req/s",
        f"{result.seconds / 60:.1f} min",
        str(result.requests),
        str(result.errors),
        *(f"{lat[q]:.1f} ms" for q in ("p50", "p99", "max")),
    ]
    row = "| " + " | ".join(cells) + " |"
    return f"""Measured on {time.strftime("%Y-%m-%d")} with `{command}` on {machine()}; TorchServe 0.12.0,
{result.batching}, the same machine running the load generator.

{header}
|---|---|---|---|---|---|---|---|---|
{row}

Warm-up at the same rate before the soak: {result.warmup_s:.0f} s, {result.warmup_errors} errors, {settled}.
RSS at the start -> at the end of the soak (medians of 5 samples), and the maximum:
{memory}.
Workers replaced during the soak: {"yes" if result.workers_replaced else "none"}.

![RSS of the JVM and the worker over the soak]({link})"""
