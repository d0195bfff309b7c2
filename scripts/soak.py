"""Soak TorchServe: hold it at ~80% of its measured capacity for N minutes and watch errors, latency
and memory.

    python -m scripts.soak                                  # 5 minutes; updates docs/reliability.md
    python -m scripts.soak --minutes 1 --no-doc             # a quick look, docs untouched
    python -m scripts.soak --minutes 0.5 --synthetic-images --model-store S --report r.json --no-doc

Needs the archive (`python -m archive.build`) and, unless --synthetic-images, the processed test set
(`python -m training.data`). It starts its own TorchServe instance ("soak", free loopback ports, a
temporary state directory; a running default server is left alone), registers the archive with its
own batching settings and always stops the server at the end. Then:

1. capacity: --clients keep-alive clients send back to back for --capacity-seconds; the answered
   requests per second are the capacity (client and server share this machine's cores, so it is the
   capacity of this setup);
2. warm-up: the same clients send at a fixed total rate of --load x capacity until the RSS of the
   JVM and of every worker has settled (within 2% over 10 samples; at most --max-warmup-seconds).
   The JVM's RSS climbs at first while it touches the heap it reserved at start (by default 1/64 of
   the host's memory), which is not a leak, so memory growth is measured from the end of this;
3. soak: the same rate for --minutes. Each client keeps its own schedule, so a slow answer delays the
   next send but not the schedule, and latency is counted from the scheduled send time: a stall shows
   up as latency instead of as a lower rate;
4. memory: throughout, every --sample-seconds, the RSS of the JVM and of each worker process.

It prints a summary and writes a JSON report (--report), a plot of RSS over time (--figure,
docs/figures/soak_rss.png) and, unless --no-doc, the figures and the exact command into the block
between the soak markers in docs/reliability.md. Exit status 1 if any request failed (warm-up
included) or a worker was replaced.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil
from PIL import Image

from scripts import serve
from scripts.bench_serving import machine

REPO = serve.REPO
DOC = REPO / "docs" / "reliability.md"
FIGURE = REPO / "docs" / "figures" / "soak_rss.png"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
ANY_PORTS = dict.fromkeys(serve.DEFAULT_PORTS, 0)
MB = 1024 * 1024
RETRY_PAUSE_S = 0.05  # a client's pause after a connection error
WORKER_SCRIPT = "model_service_worker.py"  # what a TorchServe worker process runs
STABLE_WINDOW = 10  # RSS samples that must agree within 2% before the soak starts


# --- load ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request: when it was due (time.perf_counter()), seconds until its answer, and its outcome."""

    due: float
    latency: float
    status: int  # HTTP status, or 0 when no response came
    error: str = ""  # for status 0: what went wrong (ConnectionRefusedError, RemoteDisconnected, ...)


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
    capacity). Otherwise open loop: request n is due at start + n / rate, the clients take turns.
    Each client keeps one keep-alive connection and reopens it when the server closes it. Samples
    are appended to `sink` as they happen (for callers that watch a run), and returned sorted.
    """
    parts = urlsplit(url)
    interrupt = stop if stop is not None else threading.Event()  # never set: waits on it just pause
    samples: list[Sample] = [] if sink is None else sink
    lock = threading.Lock()
    start = time.perf_counter()
    end = start + seconds

    def client(index: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        n = index
        while not interrupt.is_set():
            now = time.perf_counter()
            due = now if rate is None else start + n / rate
            if due >= end:
                break
            if due > now:
                time.sleep(due - now)  # pacing to the schedule, not waiting for a condition
            try:
                conn.request("POST", parts.path, body=bodies[n % len(bodies)], headers=headers)
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


# --- memory ------------------------------------------------------------------------------------------


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


def settled(trace: MemoryTrace, window: int = STABLE_WINDOW, tolerance: float = 0.02) -> bool:
    """Whether the RSS of the JVM and of every worker varied less than `tolerance` over the last
    `window` samples: the JVM has touched its heap and the workers have loaded everything."""
    series = [trace.jvm, *([mb for _, mb in points] for points in trace.workers.values())]
    recent = [values[-window:] for values in series]
    return all(len(values) == window and max(values) <= min(values) * (1 + tolerance) for values in recent)


def growth(series: Sequence[tuple[float, float]], since: float, window: int = 5) -> dict[str, float]:
    """How much RSS grew from `since` on: the median of the last `window` samples against the median
    of the first `window`, in %. Medians, so that a garbage collector's saw-tooth or one sample's spike
    does not count as growth while a leak's steady climb does."""
    after = [mb for t, mb in series if t >= since]
    if len(after) < 2 * window:
        return {}
    base, end = statistics.median(after[:window]), statistics.median(after[-window:])
    return {"start_mb": base, "end_mb": end, "max_mb": max(after), "growth_pct": 100 * (end - base) / base}


# --- one soak ----------------------------------------------------------------------------------------


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


def soak(
    client: serve.Client,
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
    url = f"{client.urls['inference']}/predictions/{serve.MODEL_NAME}"
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
        while loader.is_alive() and not settled(trace):
            loader.join(sample_seconds)
        warm.set()
        loader.join()
        warmup_s, warmup_settled = time.perf_counter() - start, settled(trace)
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


# --- images, outputs ---------------------------------------------------------------------------------


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def load_images(data: Path | None, count: int = 256) -> list[bytes]:
    """`count` PNG bodies: the first test images of the processed data, or random noise if data is None."""
    if data is None:
        rng = np.random.default_rng(0)
        return [png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(count)]
    from training.data import DataError, load_split

    try:
        split = load_split(data, "test")
    except (DataError, FileNotFoundError) as exc:
        raise serve.ServeError(f"{exc}; run `python -m training.data` or pass --synthetic-images") from None
    return [png(image) for image in split.images[:count].numpy()]


def plot(result: SoakResult, figure: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    memory = result.memory
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(memory["times"], memory["jvm_mb"], label="JVM (frontend)")
    for pid, series in memory["workers_mb"].items():
        ax.plot([t for t, _ in series], [mb for _, mb in series], label=f"worker pid {pid}")
    ax.axvline(0, color="grey", linestyle="--", linewidth=1, label="end of warm-up, start of the soak")
    ax.set_xlabel("seconds since the soak started (before 0: warm-up at the same rate)")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def render(result: SoakResult, command: str, figure: Path, doc: Path) -> str:
    workers = "; ".join(
        f"worker {pid}: {g['start_mb']:.0f} -> {g['end_mb']:.0f} MB ({g['growth_pct']:+.1f}%, "
        f"max {g['max_mb']:.0f})"
        for pid, g in result.workers.items()
        if g
    )
    jvm, lat = result.jvm, result.latency_ms
    settled = "RSS settled (within 2% over 10 s)" if result.warmup_settled else "RSS not settled (time limit)"
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
    return f"""{BEGIN}
Measured on {time.strftime("%Y-%m-%d")} with `{command}` on {machine()}; TorchServe 0.12.0,
{result.batching}, the same machine running the load generator.

{header}
|---|---|---|---|---|---|---|---|---|
{row}

Warm-up at the same rate before the soak: {result.warmup_s:.0f} s, {result.warmup_errors} errors, {settled}.
RSS at the start -> at the end of the soak (medians of 5 samples), and the maximum:
{memory}.
Workers replaced during the soak: {"yes" if result.workers_replaced else "none"}.

![RSS of the JVM and the worker over the soak]({link})
{END}"""


def write_doc(doc: Path, block: str) -> None:
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise serve.ServeError(f"{doc} lacks the {BEGIN} ... {END} markers; add them where the figures go")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store")
    parser.add_argument("--data", type=Path, default=REPO / "data", help="processed data (training.data)")
    parser.add_argument(
        "--synthetic-images", action="store_true", help="random-noise PNGs instead of the test set"
    )
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--sample-seconds", type=float, default=1.0, help="RSS sampling interval")
    parser.add_argument(
        "--max-warmup-seconds", type=float, default=120.0, help="limit on the warm-up before the soak"
    )
    parser.add_argument(
        "--state-dir", type=Path, help="where the soak server's instance lives (default: a temp dir)"
    )
    parser.add_argument("--report", type=Path, help="write the full result as JSON here")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true", help="leave the doc alone")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "scripts.soak", *(argv if argv is not None else sys.argv[1:])])
    try:
        if not (args.model_store / f"{serve.MODEL_NAME}.mar").is_file():
            archive = args.model_store / f"{serve.MODEL_NAME}.mar"
            raise serve.ServeError(f"{archive} not found: build it with `python -m archive.build`")
        bodies = load_images(None if args.synthetic_images else args.data)
        with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
            instance = serve.Instance("soak", args.state_dir or Path(scratch))
            server = serve.start(instance, args.model_store, ANY_PORTS)
            try:
                client = serve.Client.for_instance(instance)
                client.register()
                result = soak(
                    client, server.pid, bodies, args.minutes, args.load, args.clients,
                    args.capacity_seconds, args.max_warmup_seconds, args.sample_seconds,
                )  # fmt: skip
            finally:
                serve.stop(instance)
    except serve.ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    summary = {k: v for k, v in asdict(result).items() if k != "memory"}
    print(json.dumps(summary, indent=2))
    if args.report:
        args.report.write_text(
            json.dumps({"command": command, **asdict(result)}, indent=2) + "\n", encoding="utf-8"
        )
    title = (
        f"{result.target_rps:.0f} req/s ({result.load:.0%} of the measured {result.capacity_rps:.0f}) "
        f"for {args.minutes:g} min: RSS over time"
    )
    plot(result, args.figure, title)
    print(f"figure: {args.figure}")
    if not args.no_doc:
        try:
            write_doc(args.doc, render(result, command, args.figure, args.doc))
        except serve.ServeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"updated {args.doc}")
    return 1 if result.errors or result.warmup_errors or result.workers_replaced else 0


if __name__ == "__main__":
    sys.exit(main())
