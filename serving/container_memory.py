"""The serving container's memory under load, against the pod's memory limit: the figures of the
bench_container_memory block in docs/deploy.md.

    scripts/build_image.sh && .venv/bin/python -m scripts.bench_container_memory    # the command line

    from serving import container_memory as cm
    text, settings = cm.config_text(config_file, ["job_queue_size=32"])
    figures = cm.measure("fashion-mnist-serve:dev", text, settings, seconds=20)
    block = cm.render("fashion-mnist-serve:dev", settings, 20, figures, command)

`measure` starts the image hardened as GKE runs it (serving/container.py) with the memory limit of
the `torchserve` container in deploy/base/deployment.yaml, and with the given TorchServe config
mounted read-only and named by TS_CONFIG_FILE. Then two closed-loop loads: 28x28 PNGs from 16
clients, and the worst the config admits, PNGs of random RGB noise just under its
max_request_size from job_queue_size + 16 clients, so that the queue stays full beside a batch in
the worker and the rest are refused. The container's memory cgroup is sampled every 0.1 s (usage,
and the part the kernel cannot reclaim: anonymous memory plus tmpfs); the kernel's own peak and
whether it OOM-killed the container are read at the end.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from serving import MODEL_NAME, REPO
from serving.container import cgroup_dir, docker, first_prediction, hardened_flags
from serving.images import encode
from serving.loadgen import Sample, drive
from serving.server import InputError
from serving.tsconfig import override, parse_properties

MANIFEST = REPO / "deploy" / "base" / "deployment.yaml"
CONFIG_IN_CONTAINER = "/etc/fashion-mnist/torchserve/config.properties"
STORE_IN_CONTAINER = "/opt/fashion-serve/model-store"
SMALL_CLIENTS = 16
READY_TIMEOUT_S = 180
MIB = 2**20
# Memory cgroup of a container, by cgroup version and driver.
CGROUP_DIRS = (
    "/sys/fs/cgroup/memory/docker/{id}",
    "/sys/fs/cgroup/docker/{id}",
    "/sys/fs/cgroup/system.slice/docker-{id}.scope",
)


def torchserve_container(manifest: Path = MANIFEST) -> dict[str, Any]:
    """The Deployment's `torchserve` container, as the manifest declares it."""
    for doc in yaml.safe_load_all(manifest.read_text(encoding="utf-8")):
        if doc and doc.get("kind") == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container["name"] == "torchserve":
                    return container
    raise InputError(f"{manifest} has no Deployment with a container named 'torchserve'")


def pod_memory_limit(manifest: Path = MANIFEST) -> str:
    """The torchserve container's memory limit in the Deployment (a Kubernetes quantity)."""
    limit = torchserve_container(manifest).get("resources", {}).get("limits", {}).get("memory")
    if limit is None:
        raise InputError(f"{manifest}: the 'torchserve' container has no memory limit; set one")
    return limit


def docker_quantity(quantity: str) -> str:
    """A Kubernetes memory quantity in Mi or Gi as `docker run --memory` writes it."""
    units = {"Mi": "m", "Gi": "g"}
    if quantity[-2:] not in units:
        raise InputError(f"memory limit {quantity!r}: only Mi and Gi are understood; write it in those")
    return quantity[:-2] + units[quantity[-2:]]


def config_text(path: Path, overrides: list[str]) -> tuple[str, dict[str, str]]:
    """The config file with each KEY=VALUE of `overrides` replacing (or adding) that key, and its settings."""
    wanted = dict(item.split("=", 1) for item in overrides)
    text = path.read_text(encoding="utf-8")
    if wanted:
        text = override(text, wanted, "bench_container_memory --set")
    return text, parse_properties(text)


def noise_png(max_bytes: int) -> bytes:
    """A square PNG of random RGB noise (it does not compress) of at most `max_bytes`."""
    side = int((max_bytes * 0.99 / 3) ** 0.5)
    while True:
        pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        png = encode(pixels, compress_level=1)
        if len(png) <= max_bytes:
            return png
        side -= 16


def small_png() -> bytes:
    return encode(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))


class Cgroup:
    """Memory figures of one container's cgroup, v1 or v2, read from the host."""

    def __init__(self, container: str) -> None:
        self.dir = cgroup_dir(container, CGROUP_DIRS, "memory")
        self.v1 = (self.dir / "memory.usage_in_bytes").exists()

    def read(self, name: str) -> int:
        return int((self.dir / name).read_text().split()[0])

    def sample(self) -> tuple[int, int]:
        """(usage, unreclaimable: anonymous memory + tmpfs) in bytes."""
        stat = dict(line.split() for line in (self.dir / "memory.stat").read_text().splitlines())
        if self.v1:
            return self.read("memory.usage_in_bytes"), int(stat["total_rss"]) + int(stat["total_shmem"])
        return self.read("memory.current"), int(stat["anon"]) + int(stat["shmem"])

    def peak(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return self.read(name) if (self.dir / name).exists() else None


def run_load(
    cgroup: Cgroup, url: str, key: str, body: bytes, clients: int, seconds: float
) -> tuple[list[Sample], int, int, int | None]:
    """Closed-loop load; returns the samples, the highest sampled usage and unreclaimable bytes, and
    the kernel's peak as last read (the cgroup goes with a killed container)."""
    samples: list[Sample] = []
    done = threading.Event()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    thread = threading.Thread(
        target=drive, args=(url, headers, [body], clients, seconds), kwargs={"sink": samples, "stop": done}
    )
    usage = unreclaimable = 0
    peak = None
    thread.start()
    while thread.is_alive():
        try:
            now_usage, now_unreclaimable = cgroup.sample()
            peak = cgroup.peak()
        except FileNotFoundError:  # the container is gone (killed): its cgroup with it
            done.set()
            break
        usage, unreclaimable = max(usage, now_usage), max(unreclaimable, now_unreclaimable)
        thread.join(timeout=0.1)
    thread.join()
    return samples, usage, unreclaimable, peak


def outcomes(samples: list[Sample]) -> str:
    counts = Counter(str(s.status) if s.status else s.error for s in samples)
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))


def measure(
    image: str, text: str, settings: dict[str, str], seconds: float, store: Path | None = None
) -> dict[str, Any]:
    """Run `image` with the config `text` (whose parsed `settings` size the worst load) and the
    pod's memory limit, drive both loads for `seconds` each, and return the figures for `render`.
    `store`: a model store to mount (for the image built --target runtime)."""
    limit = pod_memory_limit()
    large = noise_png(int(settings.get("max_request_size", 6553500)) - 64 * 1024)
    large_clients = int(settings.get("job_queue_size", 100)) + 16
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.properties"
        config.write_text(text, encoding="utf-8")
        Path(tmp).chmod(0o755)
        config.chmod(0o644)  # read by the container's user
        flags = [
            *hardened_flags(docker_quantity(limit)),
            "--publish=127.0.0.1::8080",
            f"--volume={config}:{CONFIG_IN_CONTAINER}:ro",
            f"--env=TS_CONFIG_FILE={CONFIG_IN_CONTAINER}",
        ]
        if store:
            flags.append(f"--volume={store.resolve()}:{STORE_IN_CONTAINER}:ro")
        container = docker("run", "--detach", *flags, image)
        try:
            port = int(docker("port", container, "8080/tcp").rsplit(":", 1)[1])
            key = first_prediction(container, port, small_png(), READY_TIMEOUT_S, image)
            url = f"http://127.0.0.1:{port}/predictions/{MODEL_NAME}"
            cgroup = Cgroup(container)
            idle = cgroup.sample()
            rows = []
            for name, body, clients in (
                (f"28x28 PNG, {SMALL_CLIENTS} clients", small_png(), SMALL_CLIENTS),
                (f"{len(large) / MIB:.1f} MiB noise PNG, {large_clients} clients", large, large_clients),
            ):
                samples, usage, unreclaimable, peak = run_load(cgroup, url, key, body, clients, seconds)
                rows.append((name, usage, unreclaimable, outcomes(samples)))
            state = json.loads(docker("inspect", "--format", "{{json .State}}", container))
            logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
        finally:
            docker("rm", "--force", container, check=False)
    return {
        "limit": limit,
        "idle": idle,
        "rows": rows,
        "peak": peak,
        "oom_killed": bool(state.get("OOMKilled")),
        "heap_exhausted": "java.lang.OutOfMemoryError" in logs.stdout + logs.stderr,
        "running": "yes" if state.get("Running") else f"no, exit code {state.get('ExitCode')}",
    }


def render(
    image: str, settings: dict[str, str], seconds: float, figures: dict[str, Any], command: str
) -> str:
    """The bench_container_memory block of docs/deploy.md."""
    idle, peak, limit = figures["idle"], figures["peak"], figures["limit"]
    return "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')}, image `{image}`, memory limit {limit} (the pod's),",
            f"`vmargs={settings.get('vmargs', '(JVM default)')}`,",
            f"`job_queue_size={settings.get('job_queue_size')}`,",
            f"`max_request_size={settings.get('max_request_size')}`;",
            f"idle after start: {idle[0] / MIB:.0f} MiB used, {idle[1] / MIB:.0f} MiB unreclaimable.",
            "",
            f"| load ({seconds:.0f} s, closed loop) | peak usage | peak unreclaimable | answers |",
            "|---|---|---|---|",
            *(
                f"| {name} | {usage / MIB:.0f} MiB | {unreclaimable / MIB:.0f} MiB | {answers} |"
                for name, usage, unreclaimable, answers in figures["rows"]
            ),
            "",
            f"Kernel's peak over the run: {'n/a' if peak is None else f'{peak / MIB:.0f} MiB'} of {limit}; "
            f"kernel OOM kill in the container: {'yes' if figures['oom_killed'] else 'no'}; "
            f"JVM heap exhausted (OutOfMemoryError logged): {'yes' if figures['heap_exhausted'] else 'no'}; "
            f"still running: {figures['running']}.",
            "",
            f"Command: `{command}` (after `scripts/build_image.sh`).",
        ]
    )
