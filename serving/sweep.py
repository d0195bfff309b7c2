"""Sweep the project's serving settings under load, to choose the archive's defaults by measurement.
The command line is `python -m scripts.sweep_serving`.

    from serving import sweep
    grid = sweep.grid(workers=(1, 2), batch_sizes=(1, 8), delays_ms=(0, 1, 5), torch_threads=(1,),
                      netty_threads=(2,))
    results = sweep.run(store, png, grid, clients=(1, 4, 16, 64), seconds=3, scratch=tmp)
    block = sweep.render(results, command, machine)

Every grid point is the project's archive on its own local config (tokens on) with:
  * workers, batch size and max batch delay set at registration (POST /models, then scale);
  * torch threads per worker through the handler's FASHION_TORCH_THREADS (handler/fashion_handler.py);
  * netty threads: number_of_netty_threads and netty_client_threads in config.properties.
Every point gets a fresh server (threads need one anyway, and see `_servers`). Each point is
`wrk --latency` (serving.wrk) at each client count after a warm-up. A batch size of 1 never waits,
so it is swept with delay 0 only; batch > 1 with short delays (0 to 2 ms) are the settings that keep a lone
request from waiting out the whole delay, measured next to 5 ms.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from handler.fashion_handler import THREADS_ENV
from serving.bench import GOAL_P99_MS, REGISTER_TIMEOUT_S, WARMUP_S, inference, warm_up
from serving.client import Client
from serving.server import ANY_PORTS, Instance, start, stop
from serving.wrk import WrkResult
from serving.wrk import run as wrk_run


@dataclass(frozen=True, order=True)
class Point:
    torch_threads: int
    netty_threads: int
    workers: int
    batch_size: int
    delay_ms: int

    @property
    def label(self) -> str:
        threads = f"{self.torch_threads} | {self.netty_threads}"
        return f"{self.workers} | {self.batch_size} | {self.delay_ms} ms | {threads}"


def grid(
    workers: Sequence[int],
    batch_sizes: Sequence[int],
    delays_ms: Sequence[int],
    torch_threads: Sequence[int],
    netty_threads: Sequence[int],
) -> list[Point]:
    """Every combination, sorted; batch 1 only with delay 0 (a batch of one is never held back, so
    its delay is moot)."""
    points = {
        Point(t, n, w, b, d if b > 1 else 0)
        for t, n, w, b, d in itertools.product(torch_threads, netty_threads, workers, batch_sizes, delays_ms)
    }
    return sorted(points)


def _servers(
    store: Path, points: Sequence[Point], scratch: Path
) -> Iterator[tuple[Point, tuple[str, dict[str, str]]]]:
    """For each point, a fresh server with the point's threads and the model registered with its
    settings: (url, headers). One server per point, not one per thread setting: after the heaviest
    client count has overflowed the job queue, TorchServe can answer an unregistration with 500
    "Deque full" for tens of seconds, and a fresh JVM also starts every point from the same state."""
    for point in points:
        instance = Instance("sweep", scratch)
        netty = str(point.netty_threads)
        settings = {"number_of_netty_threads": netty, "netty_client_threads": netty}
        start(instance, store, ANY_PORTS, settings=settings, env={THREADS_ENV: str(point.torch_threads)})
        try:
            client = Client.for_instance(instance, timeout=REGISTER_TIMEOUT_S)
            client.register(batch_size=point.batch_size, max_batch_delay=point.delay_ms)
            client.scale(point.workers, point.workers)
            yield point, inference(client)
            client.close()
        finally:
            stop(instance)


def run(
    store: Path,
    body: bytes,
    points: Sequence[Point],
    clients: Sequence[int],
    seconds: float,
    scratch: Path,
    log: Callable[[str], None] = print,
) -> dict[Point, dict[int, WrkResult]]:
    """wrk figures for every point and client count."""
    results: dict[Point, dict[int, WrkResult]] = {}
    for point, (url, headers) in _servers(store, points, scratch):
        warm_up(url, headers, body, clients)
        results[point] = {n: wrk_run(url, headers, body, n, seconds) for n in clients}
        log(
            f"workers {point.workers}, batch {point.batch_size}, delay {point.delay_ms} ms, "
            f"torch threads {point.torch_threads}, netty threads {point.netty_threads}: "
            + "; ".join(f"{n}: {_cell(r)}" for n, r in results[point].items())
        )
    return results


def _cell(r: WrkResult) -> str:
    """Answered req/s (refusals excluded), p50 / p99 (refusals included), and the refused share."""
    refused = f", {100 * r.errors / max(r.requests, 1):.0f}% refused or failed" if r.errors else ""
    return f"{r.ok_rps:,.0f}, {r.p50:.1f} / {r.p99:.1f} ms{refused}"


def render(results: dict[Point, dict[int, WrkResult]], command: str, machine: str, seconds: float) -> str:
    """The sweep_serving block of docs/serving.md: every point, and the points that stand out."""
    clients = sorted({n for by in results.values() for n in by})
    head = " | ".join(f"{n} client{'s' if n > 1 else ''}: req/s, p50 / p99" for n in clients)
    rows = "\n".join(
        f"| {point.label} | " + " | ".join(_cell(by[n]) for n in clients) + " |"
        for point, by in sorted(results.items())
    )
    notes = []
    clean = {p: by for p, by in results.items() if all(r.errors == 0 for r in by.values())}
    if 1 in clients:
        lone = min(clean or results, key=lambda p: results[p][1].p99)
        notes.append(
            f"- lowest p99 at 1 client: {lone.label.replace(' | ', ' / ')} ({_cell(results[lone][1])})"
        )
    if 16 in clients:
        top = max(clean or results, key=lambda p: results[p][16].ok_rps)
        notes.append(
            f"- most req/s at 16 clients: {top.label.replace(' | ', ' / ')} ({_cell(results[top][16])})"
        )
        within = [p for p in clean if results[p][16].p99 <= GOAL_P99_MS]
        if within:
            best = max(within, key=lambda p: results[p][16].ok_rps)
            notes.append(
                f"- most req/s at 16 clients with p99 <= {GOAL_P99_MS:g} ms: "
                f"{best.label.replace(' | ', ' / ')} ({_cell(results[best][16])})"
            )
        else:
            notes.append(f"- no point kept p99 <= {GOAL_P99_MS:g} ms at 16 clients")
    return f"""Measured with `{command}` on {machine}; `wrk --latency`, HTTP/1.1 keep-alive, {seconds:g} s
per client count after a {WARMUP_S:g} s warm-up, the project's archive and local config, tokens on.
Points are workers / batch size / max batch delay / torch threads per worker / netty threads.

{chr(10).join(notes)}

| workers | batch | delay | torch threads | netty threads | {head} |
|{"---|" * (len(clients) + 5)}
{rows}"""
