"""What one serving container holds under a CPU limit: the figures of the bench_container_load block
in docs/deploy.md, and from them the pod's CPU request and limit and the autoscaler's target.

    scripts/build_image.sh && .venv/bin/python -m scripts.bench_container_load    # the command line

    from serving import container_load as cl
    results = cl.measure("fashion-mnist-serve:dev", png, cpus=[1, 2], clients=[1, 4, 16], seconds=5)
    advice = cl.recommend(results)           # CPU request = limit, HPA averageUtilization
    cl.plot(results, figure); block = cl.render(results, advice, command, "figures/container_load.png")
    # cl.measure(..., p99_ms=20): judge capacity by another latency bound than the issue's 10 ms

`measure` starts the image once per CPU limit, hardened as GKE runs it (serving/container.py) with
the pod's memory limit and `docker run --cpus`, with the image's own TorchServe config: the pod's
differs only in its addresses and in leaving tokens to the proxy (docs/deploy.md). After a
warm-up, `wrk` (serving/wrk.py: HTTP/1.1 keep-alive, the load of `make bench-serving` and
`make bench-peers`) drives it at each client count, and the container's CPU cgroup is read before
and after each run: its CPU time as a share of the limit, and how often the kernel throttled it.

A limit's capacity is the highest measured req/s with p99 within the bound (the issue's 10 ms
unless told otherwise) and no errors. `recommend` takes the limit with the most capacity per CPU
as the pod's request and limit, and as the HPA's target the CPU use at HEADROOM of that capacity,
so that a pod scales out before its p99 passes the bound.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serving import MODEL_NAME, REPO, wrk
from serving.bench import GOAL_P99_MS, warm_up
from serving.container import cgroup_dir, describe, docker, first_prediction, hardened_flags
from serving.container_memory import (
    MANIFEST,
    READY_TIMEOUT_S,
    STORE_IN_CONTAINER,
    docker_quantity,
    pod_memory_limit,
    torchserve_container,
)
from serving.docblock import machine
from serving.server import InputError, ServeError
from serving.wrk import WrkResult

HPA = REPO / "deploy" / "base" / "hpa.yaml"
# Scale out at this share of a pod's capacity: the HPA acts on averages over tens of seconds and a
# new pod takes about 10 s to serve, so traffic that grows meanwhile still finds room under 10 ms.
HEADROOM = 0.8
# CPU cgroup of a container, by cgroup version and driver: v1 splits usage (cpuacct) from
# throttling (cpu); v2 keeps both in cpu.stat.
CPU_DIRS = (
    "/sys/fs/cgroup/cpu,cpuacct/docker/{id}",
    "/sys/fs/cgroup/cpu/docker/{id}",
    "/sys/fs/cgroup/docker/{id}",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope",
)
ADDRESS = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"  # docker inspect --format
CPUACCT_DIRS = ("/sys/fs/cgroup/cpuacct/docker/{id}", "/sys/fs/cgroup/cpu,cpuacct/docker/{id}")
# The line of the block that records what deploy/ must say (tests/test_container_load.py checks it).
CHOSEN = re.compile(r"Chosen for deploy/: CPU request and limit `([^`]+)`, HPA `averageUtilization: (\d+)`")


@dataclass(frozen=True)
class CpuTime:
    """Cumulative figures of a container's CPU cgroup."""

    seconds: float  # CPU time used
    periods: int  # CFS periods (100 ms) in which it ran
    throttled: int  # of those, periods in which it hit its quota

    @classmethod
    def read(cls, container: str) -> CpuTime:
        stats = dict(line.split() for line in (cgroup_dir(container, CPU_DIRS, "CPU") / "cpu.stat").open())
        if "usage_usec" in stats:  # cgroup v2
            seconds = int(stats["usage_usec"]) / 1e6
        else:
            usage = cgroup_dir(container, CPUACCT_DIRS, "cpuacct") / "cpuacct.usage"
            seconds = int(usage.read_text()) / 1e9
        return cls(seconds, int(stats["nr_periods"]), int(stats["nr_throttled"]))


@dataclass(frozen=True)
class Point:
    """One wrk run against the container and what it cost in CPU."""

    load: WrkResult
    cpu: float  # CPU seconds per second of the run, as a share of the limit
    throttled: float  # share of the run's CFS periods in which the kernel throttled the container

    def within(self, p99_ms: float) -> bool:
        return self.load.p99 <= p99_ms and self.load.errors == 0


@dataclass
class LimitRun:
    """Every client count at one CPU limit."""

    cpus: float
    points: list[Point] = field(default_factory=list)

    def capacity(self, p99_ms: float) -> Point | None:
        """The point with the highest req/s and p99 <= `p99_ms` without errors; None if none was."""
        return max((p for p in self.points if p.within(p99_ms)), key=lambda p: p.load.rps, default=None)


@dataclass
class Results:
    image: str
    seconds: float
    warmup_s: float
    machine: str
    memory_limit: str
    runs: list[LimitRun] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # the management API's description
    versions: dict[str, str] = field(default_factory=dict)
    load_at_end: str = ""
    p99_ms: float = GOAL_P99_MS  # the latency bound that defines capacity


@dataclass(frozen=True)
class Advice:
    """The pod's CPU request and limit, and the HPA target that keeps it under its capacity."""

    cpus: float
    capacity: Point
    target_rps: float  # HEADROOM of the capacity
    utilization: int  # % of the limit the container used at target_rps: the HPA's averageUtilization

    @property
    def quantity(self) -> str:
        return cpu_quantity(self.cpus)


def cpu_quantity(cpus: float) -> str:
    """CPUs as Kubernetes writes them: "1", "2", "1500m"."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def image_versions(container: str) -> dict[str, str]:
    """torch and TorchServe as installed in the container (from their metadata: no torch import)."""
    script = "import importlib.metadata as m; print(m.version('torch'), m.version('torchserve'))"
    torch, torchserve = docker("exec", container, "python3", "-c", script).split()
    return {"torch": torch, "TorchServe": torchserve}


@contextlib.contextmanager
def serving_container(
    image: str, cpus: float, store: Path | None, body: bytes
) -> Iterator[tuple[str, str, str]]:
    """`image` hardened, with the pod's memory limit and `cpus` CPUs, once it has answered `body`
    with 200: yields (container id, its address on Docker's bridge, the inference key).
    `store`: a directory holding MODEL_NAME.mar to mount (for the image built --target runtime).

    Nothing is published: a published port goes through docker-proxy, a userland copy loop that
    would add latency and spend CPU outside the container's limit; in the pod, clients reach
    TorchServe through the proxy container, whose CPU is its own."""
    with tempfile.TemporaryDirectory(prefix="container-load-") as tmp:
        flags = [*hardened_flags(docker_quantity(pod_memory_limit())), f"--cpus={cpus:g}"]
        if store is not None:
            # A copy the container's user can read, whatever the store's own permissions.
            mounted = Path(tmp)
            shutil.copy(store / f"{MODEL_NAME}.mar", mounted)
            mounted.chmod(0o755)
            (mounted / f"{MODEL_NAME}.mar").chmod(0o644)
            flags.append(f"--volume={mounted}:{STORE_IN_CONTAINER}:ro")
        run = subprocess.run(["docker", "run", "--detach", *flags, image], capture_output=True, text=True)
        if run.returncode:
            raise ServeError(f"docker run --cpus={cpus:g} {image} failed: {run.stderr.strip()}")
        container = run.stdout.strip()
        try:
            address = docker("inspect", "--format", ADDRESS, container)
            if not address:
                raise ServeError(
                    f"{container} has no address on a Docker network; run it on the default bridge"
                )
            yield container, address, first_prediction(container, 8080, body, READY_TIMEOUT_S, image, address)
        finally:
            docker("rm", "--force", container, check=False)


def run_point(container: str, cpus: float, url: str, headers: dict[str, str], body: bytes, clients: int,
              seconds: float) -> Point:  # fmt: skip
    """One wrk run of `clients` for `seconds`, with the container's CPU time around it."""
    before = CpuTime.read(container)
    load = wrk.run(url, headers, body, clients, seconds)
    after = CpuTime.read(container)
    periods = after.periods - before.periods
    return Point(
        load=load,
        cpu=(after.seconds - before.seconds) / load.seconds / cpus,
        throttled=(after.throttled - before.throttled) / periods if periods else 0.0,
    )


def measure(
    image: str,
    body: bytes,
    cpus: Sequence[float],
    clients: Sequence[int],
    seconds: float,
    warmup_s: float = 2.0,
    store: Path | None = None,
    p99_ms: float = GOAL_P99_MS,
    log: Callable[[str], None] = print,
) -> Results:
    """Each CPU limit in a fresh container: a warm-up (serving.bench.warm_up), then each client count.
    `p99_ms` is the latency bound that `recommend` and `render` judge capacity by."""
    results = Results(image, seconds, warmup_s, machine(), pod_memory_limit(), p99_ms=p99_ms)
    for limit in cpus:
        with serving_container(image, limit, store, body) as (container, address, key):
            if not results.model:
                results.model = describe(container, address)
                engine = docker("version", "--format", "{{.Server.Version}}")
                results.versions = image_versions(container) | {
                    "Docker": engine,
                    "wrk": wrk.version().removeprefix("wrk "),
                }
            url = f"http://{address}:8080/predictions/{MODEL_NAME}"
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}
            warm_up(url, headers, body, clients, warmup_s)
            run = LimitRun(limit)
            for n in clients:
                point = run_point(container, limit, url, headers, body, n, seconds)
                run.points.append(point)
                log(
                    f"--cpus={limit:g} {n} clients: {point.load.rps:.0f} req/s, p50 {point.load.p50:.1f} ms, "
                    f"p99 {point.load.p99:.1f} ms, CPU {point.cpu:.0%} of the limit, "
                    f"throttled {point.throttled:.0%}, non-2xx {point.load.non_2xx}, "
                    f"socket errors {point.load.socket_errors}"
                )
            results.runs.append(run)
    results.load_at_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return results


def utilization_at(points: Sequence[Point], rps: float) -> float:
    """CPU use (share of the limit) at `rps`, linear between the measured points in order of load,
    from an idle container (0 req/s, no CPU) up to the last point that reaches `rps`."""
    known = [(0.0, 0.0), *sorted((p.load.rps, p.cpu) for p in points)]
    for (rps0, cpu0), (rps1, cpu1) in zip(known, known[1:], strict=False):
        if rps0 <= rps <= rps1:
            return cpu0 if rps1 == rps0 else cpu0 + (cpu1 - cpu0) * (rps - rps0) / (rps1 - rps0)
    raise ValueError(f"{rps:.0f} req/s is beyond every measured point")


def recommend(results: Results) -> Advice | None:
    """The CPU limit with the most capacity per CPU, and the HPA target at HEADROOM of its capacity;
    None when no limit held p99 <= 10 ms at any client count."""
    held = [(run, c) for run in results.runs if (c := run.capacity(results.p99_ms)) is not None]
    if not held:
        return None
    run, capacity = max(held, key=lambda pair: pair[1].load.rps / pair[0].cpus)
    target = HEADROOM * capacity.load.rps
    # Only the points up to the capacity: beyond it throughput stalls while CPU use still climbs.
    below = [p for p in run.points if p.load.rps <= capacity.load.rps and p.load.errors == 0]
    utilization = utilization_at(below, target)
    return Advice(run.cpus, capacity, target, int(utilization * 100))


def deployed(manifest: Path = MANIFEST, hpa: Path = HPA) -> tuple[str | None, str | None, int | None]:
    """What deploy/ says now: the torchserve container's CPU request and limit, and the HPA's
    averageUtilization for that container's CPU."""
    container = torchserve_container(manifest)
    resources = container.get("resources", {})
    target = None
    for metric in yaml.safe_load(hpa.read_text(encoding="utf-8"))["spec"].get("metrics", []):
        source = metric.get("containerResource", {})
        if source.get("name") == "cpu" and source.get("container") == "torchserve":
            target = source["target"].get("averageUtilization")
    return resources.get("requests", {}).get("cpu"), resources.get("limits", {}).get("cpu"), target


def recorded(doc_text: str) -> tuple[str, int] | None:
    """(CPU quantity, averageUtilization) as the doc's bench_container_load block chose them."""
    found = CHOSEN.search(doc_text)
    return (found.group(1), int(found.group(2))) if found else None


def _cell(point: Point) -> str:
    return f"{point.load.rps:,.0f} req/s ({point.load.connections} clients), p99 {point.load.p99:.1f} ms"


def render(results: Results, advice: Advice | None, command: str, figure: str | None) -> str:
    """The bench_container_load block of docs/deploy.md."""
    model, goal = results.model, f"{results.p99_ms:g} ms"
    workers = len(model.get("workers", []))
    versions = ", ".join(f"{name} {version}" for name, version in results.versions.items())
    rows = "\n".join(
        f"| {run.cpus:g} | {p.load.connections} | {p.load.rps:,.0f} | {p.load.p50:.1f} ms | "
        f"{p.load.p99:.1f} ms | {p.load.non_2xx} / {p.load.socket_errors} | {p.cpu:.0%} | {p.throttled:.0%} |"
        for run in results.runs
        for p in run.points
    )
    capacity_rows = "\n".join(
        f"| {run.cpus:g} | "
        + (
            f"{_cell(c)} | {c.load.rps / run.cpus:,.0f} | {c.cpu:.0%} |"
            if (c := run.capacity(results.p99_ms))
            else f"none: p99 above {goal} (or errors) at every client count | - | - |"
        )
        for run in results.runs
    )
    if advice is None:
        chosen = (
            f"No CPU limit held p99 <= {goal} at any measured client count, so these figures "
            "set nothing in deploy/."
        )
    else:
        chosen = (
            f"The most capacity per CPU came at a limit of {advice.cpus:g} CPU: {_cell(advice.capacity)}. "
            f"{HEADROOM:.0%} of it, {advice.target_rps:,.0f} req/s, cost {advice.utilization} % of the limit "
            "(linear between the measured points).\n"
            f"Chosen for deploy/: CPU request and limit `{advice.quantity}`, "
            f"HPA `averageUtilization: {advice.utilization}`."
        )
    plot_line = f"\n![req/s and p99 latency against clients, per CPU limit]({figure})\n" if figure else ""
    return f"""Measured {time.strftime("%Y-%m-%d")} with `{command}`
on {results.machine}; at the end {results.load_at_end}. Image `{results.image}`; {versions}.
Model version {model.get("modelVersion")}: batchSize {model.get("batchSize")}, maxBatchDelay
{model.get("maxBatchDelay")} ms, {workers} worker(s) (the archive's settings); the image's own
TorchServe config (tokens on), hardened as on GKE with the pod's memory limit
({results.memory_limit}) and `docker run --cpus` as the CPU limit. Each point: `wrk --latency`,
HTTP/1.1 keep-alive, {results.seconds:g} s after a {results.warmup_s:g} s warm-up, one 28x28 PNG
of the test set. CPU: the container's cgroup CPU time over the run, as a share of the limit;
throttled: the share of the kernel's 100 ms CFS periods in which the container used up its quota
and waited.

| CPU limit | clients | req/s | p50 | p99 | errors: non-2xx / socket | CPU use of the limit | throttled |
|---|---|---|---|---|---|---|---|
{rows}

Capacity at p99 <= {goal} (the highest measured req/s with p99 <= {goal} and no errors):

| CPU limit | capacity | req/s per CPU | CPU use there |
|---|---|---|---|
{capacity_rows}
{plot_line}
{chosen}"""


def plot(results: Results, figure: Path) -> None:
    """Answered req/s (refusals left out) and p99 latency against clients, one line per CPU limit,
    the latency bound dotted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (rate, latency) = plt.subplots(1, 2, figsize=(9, 4))
    for run in results.runs:
        clients = [p.load.connections for p in run.points]
        label = f"--cpus={run.cpus:g}"
        rate.plot(clients, [p.load.ok_rps for p in run.points], marker="o", label=label)
        latency.plot(clients, [p.load.p99 for p in run.points], marker="o", label=label)
    latency.axhline(results.p99_ms, linestyle=":", color="red", linewidth=1, label=f"{results.p99_ms:g} ms")
    ticks = sorted({p.load.connections for run in results.runs for p in run.points})
    for ax, name in ((rate, "answered, refusals left out (req/s)"), (latency, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_xlabel("keep-alive clients (wrk)")
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Serving container under a CPU limit")
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def check_store(store: Path) -> None:
    """InputError naming the build command unless `store` holds the model's archive."""
    if not (store / f"{MODEL_NAME}.mar").is_file():
        raise InputError(
            f"--model-store {store} has no {MODEL_NAME}.mar: build one with "
            f"`python -m archive.build --store {store}`"
        )
