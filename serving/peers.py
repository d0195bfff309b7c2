"""The peer benchmark: this project's TorchServe against stock TorchServe, LitServe and the
in-process limit, in one run, on the same model file and the same PNG: the one inside the project's
archive, i.e. the variant it serves (int8 by default). The command line is
`python -m scripts.bench_peers` (`make bench-peers`, which first creates the peer venv).

    from serving import peers
    setup = peers.Setup(model_store, png, peer_python=peers.PEER_PYTHON)
    results = peers.measure(setup, scratch)          # every server, config and client count
    peers.plot(results, figure); block = peers.render(results, command, figure_link)

The servers:
  * project   this project's archive as `make all` builds it, its own config, tokens on: first with
              the archive's defaults (the figures the goals judge), then with each of CONFIGS;
  * stock     TorchServe's stock ImageClassifier, changed only to take 28x28 grayscale input
              (serving/peer_apps/stock_handler.py), in its own .mar with the archive's model.pt;
              stock config.properties with tokens off, served from .venv-peers (it has captum);
  * litserve  LitServe (requirements-peers.txt) with that model.pt (serving/peer_apps/litserve_app.py);
  * in-process  decode + preprocess + forward + top-5 in this process on one torch thread, with
              the project's own functions, at batch 1 and batch 8: what no server can beat.
Every server point is `wrk --latency` (serving.wrk) with HTTP/1.1 keep-alive clients, after a
warm-up. Both TorchServe servers log with the project's lean log4j2 config (serving.server.start),
so the comparison is of handlers and settings, not of log volume.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import requests

from handler.fashion_handler import DEFAULT_THREADS
from handler.meta import ModelMeta
from serving import MODEL_NAME, REPO, wrk
from serving.bench import GOAL_P99_MS, REGISTER_TIMEOUT_S, inference, warm_up
from serving.client import Client
from serving.docblock import machine
from serving.server import (
    ANY_PORTS,
    HOST,
    InputError,
    Instance,
    ServeError,
    free_ports,
    log_tail,
    start,
    stop,
)
from serving.waiting import WaitTimeout, wait_for
from serving.wrk import WrkResult

PEER_VENV = REPO / ".venv-peers"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_REQUIREMENTS = REPO / "requirements-peers.txt"
VENV_HINT = (
    "create it with `make bench-peers`, or: python3 -m venv .venv-peers && "
    ".venv-peers/bin/pip install -r requirements-peers.txt -c requirements.txt"
)
APPS = Path(__file__).resolve().parent / "peer_apps"
STOCK_HANDLER = APPS / "stock_handler.py"
LITSERVE_APP = APPS / "litserve_app.py"
# Stock TorchServe settings, but for what a benchmark must change: no tokens (as the table
# ran it), the management API open to register the archive with each config, and time for a worker
# to load on a busy machine (the stock handler imports captum; the default 120 s can run out).
STOCK_CONFIG = "disable_token_authorization=true\nenable_model_api=true\ndefault_startup_timeout=600\n"
PEERS = ("project", "stock", "litserve")
SERVED_FILES = ("model.pt", "model_meta.json", "index_to_name.json")  # what the peers load
PEER_MODULES = ("litserve", "captum", "ts", "torchvision", "multipart")  # what the peers import
GOAL_RATIO = 2.5  # the goal: the project's defaults serve 2.5x the best peer at 16 clients
TOP_K = 5
STARTUP_TIMEOUT_S = 600  # LitServe spawns its workers: each imports torch afresh, slow on a busy machine


@dataclass(frozen=True)
class Config:
    """One server configuration: worker processes, batch size and max batch delay."""

    workers: int
    batch_size: int
    max_batch_delay_ms: int

    @property
    def label(self) -> str:
        worker = "worker" if self.workers == 1 else "workers"
        return f"{self.workers} {worker}, batch {self.batch_size}, {self.max_batch_delay_ms} ms"


# The table: the best of these four for every server (1 or 2 workers, batch 1 or 8).
CONFIGS = (Config(1, 1, 0), Config(2, 1, 0), Config(1, 8, 5), Config(2, 8, 5))
DEFAULTS = "archive defaults"


@dataclass(frozen=True)
class Target:
    """What wrk sends for one server configuration."""

    url: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Setup:
    model_store: Path  # holds the project's fashion_mnist.mar (archive.build): every server's model
    body: bytes  # the PNG every request sends
    peer_python: Path = PEER_PYTHON
    clients: Sequence[int] = (1, 4, 16, 64)
    seconds: float = 10.0
    warmup_s: float = 2.0
    configs: Sequence[Config] = CONFIGS
    peers: Sequence[str] = PEERS
    in_process_s: float = 5.0
    # Torch threads per peer worker (OMP_NUM_THREADS): the project's own per-worker default, so the
    # servers differ in serving code, not in a tuning knob. None: torch's default, one per core,
    # which on 2 cores has two workers' threads fight (LitServe, 1 client: p99 19 ms against 4 ms).
    peer_torch_threads: int | None = DEFAULT_THREADS


@dataclass
class Results:
    machine: str
    setup: Setup
    versions: dict[str, str]
    model: ModelMeta  # of the model file every server ran
    # points[peer][config label][clients]
    points: dict[str, dict[str, dict[int, WrkResult]]] = field(default_factory=dict)
    in_process: dict[int, float] = field(default_factory=dict)  # batch size -> images/s
    load_at_end: str = ""


def check(setup: Setup) -> None:
    """Every input the run needs, or InputError naming the fix, before any server starts."""
    if not {1, 16} <= set(setup.clients):
        raise InputError(f"--clients must include 1 and 16 (the goals' client counts), got {setup.clients}")
    mar = setup.model_store / f"{MODEL_NAME}.mar"
    if not mar.is_file():
        raise InputError(f"{mar} not found: build it with `make all` (or `make archive`)")
    try:
        with zipfile.ZipFile(mar) as archive:
            missing = sorted(set(SERVED_FILES) - set(archive.namelist()))
    except zipfile.BadZipFile:
        missing = ["everything: it is not a zip file"]
    if missing:
        raise InputError(f"{mar} lacks {', '.join(missing)}: rebuild it with `make archive`")
    wrk.executable()
    if {"stock", "litserve"} & set(setup.peers):
        if not setup.peer_python.is_file():
            raise InputError(f"no peer venv at {setup.peer_python.parent.parent}: {VENV_HINT}")
        # find_spec, not import: importing torch can take a minute on a busy machine.
        script = (
            "import importlib.util as u; "
            f"print(' '.join(m for m in {PEER_MODULES!r} if u.find_spec(m) is None))"
        )
        probe = subprocess.run([str(setup.peer_python), "-c", script], capture_output=True, text=True)
        if probe.returncode != 0 or probe.stdout.strip():
            missing = probe.stdout.strip() or probe.stderr.strip()[-200:]
            raise InputError(f"the peer venv lacks {missing}: {VENV_HINT}")


def versions(peer_python: Path | None) -> dict[str, str]:
    """Versions of what the figures depend on: the project's torch and TorchServe, the peer venv's
    LitServe and TorchServe, and wrk."""
    found = {
        "torch": metadata.version("torch"),
        "torchserve": metadata.version("torchserve"),
        "wrk": wrk.version().removeprefix("wrk "),
    }
    if peer_python is not None and peer_python.is_file():
        script = (
            "import json, importlib.metadata as m; "
            "print(json.dumps({p: m.version(p) for p in ('torch', 'torchserve', 'litserve')}))"
        )
        out = subprocess.run([str(peer_python), "-c", script], capture_output=True, text=True, check=True)
        found |= {f"peer {name}": version for name, version in json.loads(out.stdout).items()}
    return found


def served_model(store: Path, out: Path) -> Path:
    """Unpack the model files of the project's archive (checked by `check`) into `out`: the variant
    the project serves, so that the peers and the in-process limit run the very file it runs."""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(store / f"{MODEL_NAME}.mar") as archive:
        for name in SERVED_FILES:
            (out / name).write_bytes(archive.read(name))
    return out


def measure(setup: Setup, scratch: Path, log: Callable[[str], None] = print) -> Results:
    """Every selected server under every config and client count, then the in-process limit."""
    model_dir = served_model(setup.model_store, scratch / "served-model")
    results = Results(
        machine(),
        setup,
        versions(setup.peer_python if set(setup.peers) - {"project"} else None),
        ModelMeta.load(model_dir),
    )
    servers = {"project": project_targets, "stock": stock_targets, "litserve": litserve_targets}
    for peer in setup.peers:
        results.points[peer] = {}
        for label, target in servers[peer](setup, model_dir, scratch):
            warm_up(target.url, target.headers, target.body, setup.clients, setup.warmup_s)
            points = {
                clients: wrk.run(target.url, target.headers, target.body, clients, setup.seconds)
                for clients in setup.clients
            }
            results.points[peer][label] = points
            log(f"{peer}, {label}: " + "; ".join(_short(r) for r in points.values()))
    results.in_process = in_process(model_dir, setup.body, setup.in_process_s)
    log(f"in-process: {results.in_process}")
    results.load_at_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return results


def _threads(setup: Setup) -> str:
    if setup.peer_torch_threads is None:
        return "torch's default threads (one per core)"
    n = setup.peer_torch_threads
    return f"{n} torch thread{'s' if n > 1 else ''} per worker, as the project's workers have by default"


def _short(r: WrkResult) -> str:
    errors = f", {r.errors} errors" if r.errors else ""
    return f"{r.connections} clients {r.rps:.0f} req/s p99 {r.p99:.1f} ms{errors}"


def project_targets(setup: Setup, _model_dir: Path, scratch: Path) -> Iterator[tuple[str, Target]]:
    """This project's server, tokens on: the archive's defaults, then each config."""
    instance = Instance("peers-project", scratch)
    start(instance, setup.model_store, ANY_PORTS)
    try:
        client = Client.for_instance(instance, timeout=REGISTER_TIMEOUT_S)
        for config in (None, *setup.configs):
            if config is None:
                client.register()
                described = client.describe()[0]
                label = (
                    f"{DEFAULTS} ({len(described['workers'])} worker, batch {described['batchSize']}, "
                    f"{described['maxBatchDelay']} ms)"
                )
            else:
                client.register(batch_size=config.batch_size, max_batch_delay=config.max_batch_delay_ms)
                client.scale(config.workers, config.workers)
                label = config.label
            yield label, Target(*inference(client), setup.body)
            client.unregister()
        client.close()
    finally:
        stop(instance)


def build_stock_archive(model_dir: Path, store: Path) -> Path:
    """The stock handler's .mar (model name fashion_mnist) from the exported model, in `store`."""
    store.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    extra = ",".join(str(model_dir / name) for name in ("model_meta.json", "index_to_name.json"))
    command = [
        str(archiver), "--model-name", MODEL_NAME, "--version", "1.0",
        "--serialized-file", str(model_dir / "model.pt"), "--handler", str(STOCK_HANDLER),
        "--extra-files", extra, "--export-path", str(store), "--force",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServeError(f"torch-model-archiver failed for the stock peer:\n{done.stderr[-1500:]}")
    return store / f"{MODEL_NAME}.mar"


def peer_env(setup: Setup) -> dict[str, str]:
    """Environment for a peer server and its workers: their torch thread count (Setup.peer_torch_threads)."""
    return {} if setup.peer_torch_threads is None else {"OMP_NUM_THREADS": str(setup.peer_torch_threads)}


def stock_targets(setup: Setup, model_dir: Path, scratch: Path) -> Iterator[tuple[str, Target]]:
    """Stock TorchServe from the peer venv with the stock handler, tokens off: each config."""
    store = scratch / "stock-store"
    build_stock_archive(model_dir, store)
    instance = Instance("peers-stock", scratch)
    start(instance, store, ANY_PORTS, config=STOCK_CONFIG, python=str(setup.peer_python), env=peer_env(setup))
    try:
        client = Client.for_instance(instance, timeout=REGISTER_TIMEOUT_S)
        for config in setup.configs:
            # The stock .mar sets no workers, so registration starts exactly these: no extra worker
            # (each imports torch and captum) comes up only to be scaled away.
            try:
                client.register(
                    batch_size=config.batch_size,
                    max_batch_delay=config.max_batch_delay_ms,
                    initial_workers=config.workers,
                )
            except ServeError as err:
                raise ServeError(f"{err}; end of {instance.log_file}:\n{log_tail(instance, 30)}") from None
            yield config.label, Target(*inference(client), setup.body)
            client.unregister()
        client.close()
    finally:
        stop(instance)


def multipart(body: bytes, field_name: str = "request", filename: str = "image.png") -> tuple[bytes, str]:
    """`body` as a multipart/form-data upload of one file; returns (payload, its Content-Type)."""
    boundary = "peer-benchmark-boundary-7f3a"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@contextmanager
def litserve_server(setup: Setup, model_dir: Path, config: Config, scratch: Path) -> Iterator[str]:
    """A LitServe app on a free loopback port for `config`; yields its base URL, always stops it."""
    port = free_ports(1)[0]
    command = [
        str(setup.peer_python), str(LITSERVE_APP), "--model-dir", str(model_dir),
        "--port", str(port), "--workers", str(config.workers), "--max-batch-size", str(config.batch_size),
        "--batch-timeout-ms", str(config.max_batch_delay_ms),
    ]  # fmt: skip
    log_file = scratch / f"litserve-{port}.log"
    with log_file.open("wb") as log:
        # Its own session: LitServe starts worker processes, and all of them go when it stops.
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **peer_env(setup)},
        )
    base = f"http://{HOST}:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-1500:]
            raise ServeError(f"LitServe exited with status {proc.returncode}:\n{tail}")
        try:
            return requests.get(f"{base}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        try:
            wait_for(healthy, STARTUP_TIMEOUT_S, "LitServe's /health", interval=0.2)
        except WaitTimeout as err:
            raise ServeError(
                f"{err}; end of {log_file}:\n{log_file.read_text(errors='replace')[-1500:]}"
            ) from None
        yield base
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM the process group `proc` leads (LitServe and its workers), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the leader
    proc.wait()


def litserve_targets(setup: Setup, model_dir: Path, scratch: Path) -> Iterator[tuple[str, Target]]:
    """LitServe from the peer venv, one fresh server per config (its settings are fixed at start)."""
    payload, content_type = multipart(setup.body)
    for config in setup.configs:
        with litserve_server(setup, model_dir, config, scratch) as base:
            yield config.label, Target(f"{base}/predict", {"Content-Type": content_type}, payload)


def in_process(
    model_dir: Path, body: bytes, seconds: float, batch_sizes: Sequence[int] = (1, 8)
) -> dict[int, float]:
    """Images/s of decode + preprocess + forward + top-5 in this process on one torch thread, with
    the handler's own functions and model loading: the ceiling for any server on one core."""
    import torch

    from handler.fashion_handler import load_model
    from handler.postprocess import probabilities, top_k
    from handler.preprocess import preprocess

    meta = ModelMeta.load(model_dir)
    model = load_model(model_dir / "model.pt", meta.variant)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    try:
        for batch_size in batch_sizes:

            def step(n: int = batch_size) -> None:
                batch = torch.stack([preprocess(body, meta.preprocess) for _ in range(n)])
                with torch.inference_mode():
                    probs = probabilities(model(batch))
                for row in probs:
                    top_k(row, meta.classes, TOP_K)

            for _ in range(20):  # warm-up: TorchScript's profiling runs, allocator
                step()
            images, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds:
                step()
                images += batch_size
            rates[batch_size] = images / elapsed
    finally:
        torch.set_num_threads(threads)
    return rates


def best(points: dict[str, dict[int, WrkResult]], clients: int) -> tuple[str, WrkResult]:
    """The best config at `clients`: the lowest p99 at 1 client (a lone user's wait), the most
    req/s otherwise; configs that had errors count only when every config had some."""
    runs = [(label, by_clients[clients]) for label, by_clients in points.items() if clients in by_clients]
    clean = [run for run in runs if run[1].errors == 0] or runs
    if clients == 1:
        return min(clean, key=lambda run: run[1].p99)
    return max(clean, key=lambda run: run[1].rps)


def defaults(results: Results) -> tuple[str, dict[int, WrkResult]]:
    """The project's archive-defaults label and points."""
    for label, points in results.points.get("project", {}).items():
        if label.startswith(DEFAULTS):
            return label, points
    raise KeyError("the run has no project server with the archive's defaults")


@dataclass(frozen=True)
class Goal:
    text: str
    measured: str
    met: bool


def goals(results: Results) -> list[Goal]:
    """The issue's goals, from figures of this run: the project's defaults against the best config
    of each peer."""
    if "project" not in results.points:
        return []
    _, mine = defaults(results)
    found = []
    for peer, name in (("stock", "stock TorchServe"), ("litserve", "LitServe")):
        if peer in results.points:
            label, theirs = best(results.points[peer], 16)
            ratio = mine[16].rps / theirs.rps
            found.append(
                Goal(
                    f"16 clients: defaults >= {GOAL_RATIO:g}x the best {name} config",
                    f"{mine[16].rps:.0f} / {theirs.rps:.0f} req/s ({label}) = {ratio:.2f}x",
                    ratio >= GOAL_RATIO,
                )
            )
    found.append(
        Goal(
            f"16 clients: defaults p99 <= {GOAL_P99_MS:g} ms",
            f"{mine[16].p99:.1f} ms",
            mine[16].p99 <= GOAL_P99_MS and mine[16].errors == 0,
        )
    )
    if "litserve" in results.points:
        label, theirs = best(results.points["litserve"], 1)
        found.append(
            Goal(
                "1 client: defaults p99 <= the best LitServe config's p99",
                f"{mine[1].p99:.1f} ms vs {theirs.p99:.1f} ms ({label})",
                mine[1].p99 <= theirs.p99,
            )
        )
    return found


NAMES = {"project": "this project", "stock": "stock TorchServe `ImageClassifier`", "litserve": "LitServe"}


def _cell(r: WrkResult | None) -> str:
    if r is None:
        return "-"
    errors = f", {r.errors} errors" if r.errors else ""
    return f"{r.rps:,.0f}, {r.p99:.1f} ms{errors}"


def render(results: Results, command: str, figure: str | None) -> str:
    """The bench_peers block of docs/serving.md: summary, goals, plot, every point."""
    setup, clients = results.setup, list(results.setup.clients)
    head = " | ".join(f"{n} client{'s' if n > 1 else ''}: req/s, p99" for n in clients)
    rows = []
    for peer, points in results.points.items():
        if peer == "project":
            label, mine = defaults(results)
            rows.append(
                f"| {NAMES[peer]} | {label} | " + " | ".join(_cell(mine.get(n)) for n in clients) + " |"
            )
        cells = []
        for n in clients:
            label, r = best(points, n)
            cells.append(f"{_cell(r)} ({label})")
        rows.append(f"| {NAMES[peer]} | best config per column | " + " | ".join(cells) + " |")
    limit = ", ".join(f"{rate:,.0f} img/s (batch {bs})" for bs, rate in results.in_process.items())
    rows.append(
        f"| in-process, 1 thread | decode + preprocess + forward + top-5 | {limit} |"
        + " |" * (len(clients) - 1)
    )
    goal_lines = "\n".join(
        f"- {goal.text}: {goal.measured}: **{'met' if goal.met else 'not met'}**" for goal in goals(results)
    )
    every = "\n".join(
        f"| {NAMES[peer]} | {label} | " + " | ".join(_cell(by.get(n)) for n in clients) + " |"
        for peer, points in results.points.items()
        for label, by in points.items()
    )
    versions = ", ".join(f"{name} {version}" for name, version in results.versions.items())
    plot_line = f"\n![p99 latency against throughput, per server]({figure})\n" if figure else ""
    return f"""Measured on {time.strftime("%Y-%m-%d")} with `{command}` (`make bench-peers`)
on {results.machine}; at the end {results.load_at_end}. Versions: {versions}.
Model: the archive's `model.pt` ({results.model.version}, variant {results.model.variant}) for every server
and the in-process limit; every request sends the same 28x28 PNG.
Each point: `wrk --latency`, HTTP/1.1 keep-alive, {setup.seconds:g} s after a {setup.warmup_s:g} s warm-up.
The project's server runs its own config with tokens on; stock TorchServe (stock config, the stock
handler's transforms set to 28x28 grayscale) and LitServe run with tokens off and {_threads(setup)}.
Configs tried per server: {"; ".join(c.label for c in setup.configs)}.

| server | config | {head} |
|{"---|" * (len(clients) + 2)}
{chr(10).join(rows)}

Goals (issue 12), from the figures above:
{goal_lines or "- not judged: the run left out the project's server"}
{plot_line}
<details><summary>Every server, config and client count</summary>

| server | config | {head} |
|{"---|" * (len(clients) + 2)}
{every}

</details>"""


def plot(results: Results, figure: Path) -> None:
    """p99 latency against throughput: one line per server (the project's defaults, each peer's
    config that served most at 16 clients) through its client counts, and the in-process limit."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    lines: list[tuple[str, dict[int, WrkResult]]] = []
    if "project" in results.points:
        lines.append((f"this project, {DEFAULTS}", defaults(results)[1]))
    for peer, points in results.points.items():
        label, _ = best(points, 16)
        lines.append((f"{NAMES[peer].replace('`', '')}, {label}", points[label]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, by_clients in lines:
        runs = sorted(by_clients.items())
        ax.plot([r.rps for _, r in runs], [r.p99 for _, r in runs], marker="o", label=name)
        for n, r in runs:
            ax.annotate(str(n), (r.rps, r.p99), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for batch_size, rate in results.in_process.items():
        ax.axvline(rate, linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"in-process, batch {batch_size}", (rate, 0.98), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="grey")  # fmt: skip
    ax.axhline(GOAL_P99_MS, linestyle=":", color="red", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("throughput (req/s); numbers at the points: clients")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title("Peer benchmark: same model, same PNG, wrk keep-alive clients")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
