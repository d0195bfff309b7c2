"""Load for a running TorchServe: closed- and open-loop clients, per-request samples, memory traces.

    from serving import loadgen
    samples = loadgen.drive(url, headers, bodies, clients=16, seconds=10)              # closed loop
    samples = loadgen.drive(url, headers, bodies, clients=16, seconds=60, rate=400)    # open loop
    answers = loadgen.post_all(url, bodies, headers)      # each body once, answers in order

Used by the soak (scripts/soak.py) and the tests (fixed-rate and memory runs; the benchmarks'
closed-loop figures come from serving.wrk). Clients use http.client
over keep-alive connections rather than requests: on a 2-core machine the load generator shares
the CPU with the server, and requests costs several times more CPU per call.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil

MB = 1024 * 1024
RETRY_PAUSE_S = 0.05  # a client's pause after a connection error
WORKER_SCRIPT = "model_service_worker.py"  # what a TorchServe worker process runs
# RSS samples (one a second) that must agree within 2% for memory to count as settled. 20, not 10:
# the JVM's native memory (JIT code cache, metaspace) climbs in steps while hot paths compile, and a
# 10 s flat stretch between two steps let a 30 s soak start mid-climb and see +11% with no leak.
STABLE_WINDOW = 20


@dataclass(frozen=True)
class Sample:
    """One request: when it was due (time.perf_counter()), seconds until its answer, and its outcome."""

    due: float
    latency: float
    status: int  # HTTP status, or 0 when no response came
    error: str = ""  # for status 0: what went wrong (ConnectionRefusedError, RemoteDisconnected, ...)


def _connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60), parts.path


def drive(
    url: str,
    headers: dict[str, str],
    bodies: Sequence[bytes],
    clients: int,
    seconds: float,
    rate: float | None = None,
    stop: threading.Event | None = None,
    sink: list[Sample] | None = None,
) -> list[Sample]:
    """POST `bodies` (round robin) to `url` from `clients` threads for `seconds` or until `stop` is set.

    rate None: closed loop, each client sends as soon as its previous answer is in (measures
    capacity). Otherwise open loop: request n is due at start + n / rate, the clients take turns,
    and latency counts from the due time, so a stall shows as latency instead of a lower rate.
    Each client keeps one keep-alive connection and reopens it when the server closes it. Samples
    are appended to `sink` as they happen (for callers that watch a run), and returned sorted.
    """
    interrupt = stop if stop is not None else threading.Event()  # never set: waits on it just pause
    samples: list[Sample] = [] if sink is None else sink
    lock = threading.Lock()
    start = time.perf_counter()
    end = start + seconds

    def client(index: int) -> None:
        conn, path = _connection(url)
        n = index
        while not interrupt.is_set():
            now = time.perf_counter()
            due = now if rate is None else start + n / rate
            if due >= end:
                break
            if due > now:
                time.sleep(due - now)  # pacing to the schedule, not waiting for a condition
            try:
                conn.request("POST", path, body=bodies[n % len(bodies)], headers=headers)
                resp = conn.getresponse()
                resp.read()
                sample = Sample(due, time.perf_counter() - due, resp.status)
                if resp.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                sample = Sample(due, time.perf_counter() - due, 0, type(exc).__name__)
                conn.close()
                interrupt.wait(RETRY_PAUSE_S)  # a server that is down is not hammered
            with lock:
                samples.append(sample)
            n += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with lock:
        return sorted(samples, key=lambda s: s.due)


def post_all(
    url: str, bodies: Sequence[bytes], headers: dict[str, str], clients: int = 16
) -> list[tuple[int, Any]]:
    """POST every body once from `clients` threads, each over its own keep-alive connection.

    Returns (status, parsed JSON or None) in the order of `bodies`.
    """
    local = threading.local()
    connections: list[http.client.HTTPConnection] = []

    def post(body: bytes) -> tuple[int, Any]:
        if not hasattr(local, "conn"):
            local.conn, local.path = _connection(url)
            connections.append(local.conn)
        # A closed connection (TorchServe closes after some errors) reopens on the next request.
        local.conn.request("POST", local.path, body=body, headers=headers)
        resp = local.conn.getresponse()
        payload = resp.read()
        try:
            return resp.status, json.loads(payload)
        except ValueError:
            return resp.status, None

    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            return list(pool.map(post, bodies))
    finally:
        for conn in connections:
            conn.close()


@dataclass
class MemoryTrace:
    """RSS over time of the JVM and of every worker process seen (children running WORKER_SCRIPT)."""

    jvm_pid: int
    times: list[float] = field(default_factory=list)
    jvm: list[float] = field(default_factory=list)  # MB
    workers: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # pid -> [(t, MB)]

    def sample(self, t: float) -> None:
        jvm = psutil.Process(self.jvm_pid)
        self.times.append(t)
        self.jvm.append(jvm.memory_info().rss / MB)
        for child in jvm.children(recursive=True):
            # Not every child is a worker: TorchServe also runs a system-metrics script each minute.
            try:
                if any(arg.endswith(WORKER_SCRIPT) for arg in child.cmdline()):
                    self.workers.setdefault(child.pid, []).append((t, child.memory_info().rss / MB))
            except psutil.NoSuchProcess:
                continue

    def settled(self, window: int = STABLE_WINDOW, tolerance: float = 0.02) -> bool:
        """Whether the RSS of the JVM and of every worker varied less than `tolerance` over the last
        `window` samples: the JVM has touched its heap and the workers have loaded everything."""
        series = [self.jvm, *([mb for _, mb in points] for points in self.workers.values())]
        recent = [values[-window:] for values in series]
        return all(
            len(values) == window and max(values) <= min(values) * (1 + tolerance) for values in recent
        )


def record_memory(
    trace: MemoryTrace, interval: float, done: threading.Event, start: float
) -> threading.Thread:
    """Sample `trace` every `interval` s in a background thread until `done` is set."""

    def run() -> None:
        while True:
            trace.sample(time.perf_counter() - start)
            if done.wait(interval):
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def growth(series: Sequence[tuple[float, float]], since: float, window: int = 5) -> dict[str, float]:
    """How much RSS grew from `since` on: the median of the last `window` samples against the median
    of the first `window`, in %. Medians, so that a garbage collector's saw-tooth or one sample's spike
    does not count as growth while a leak's steady climb does."""
    after = [mb for t, mb in series if t >= since]
    if len(after) < 2 * window:
        return {}
    base, end = statistics.median(after[:window]), statistics.median(after[-window:])
    return {"start_mb": base, "end_mb": end, "max_mb": max(after), "growth_pct": 100 * (end - base) / base}
