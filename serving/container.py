"""The serving image run the way GKE runs it (deploy/base/deployment.yaml), as `docker run` flags.

    from serving.container import hardened_flags
    subprocess.run(["docker", "run", "--detach", *hardened_flags(), "fashion-mnist-serve:dev"])

Used by the container benchmarks (`python -m scripts.bench_container`: cold start, memory, image
size; `python -m scripts.bench_container_memory`, serving/container_memory.py: memory under load)
and the container tests, so all of them start the image exactly as the cluster would.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving import MODEL_NAME
from serving.server import InputError, ServeError
from serving.waiting import WaitTimeout, wait_for

MEMORY_UNITS = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}  # `docker stats` MemUsage units, in MiB
UID = 10001  # the image's user (Dockerfile), and the pod's runAsUser
# Writable directories of the serving image (Dockerfile): TorchServe's temp dir and its HOME.
WRITABLE = ("/tmp", "/home/model-server")
# Published ports on loopback: no proxy in between, whatever the environment says.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def hardened_flags(memory: str = "1g", writable: tuple[str, ...] = WRITABLE) -> list[str]:
    """What GKE enforces as `docker run` flags: a read-only root with tmpfs where the image writes,
    non-root, no capabilities, no privilege gain, the pod's memory limit."""
    flags = ["--read-only", f"--user={UID}:{UID}", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
    return [*flags, f"--memory={memory}", *(f"--tmpfs={path}:uid={UID},gid={UID}" for path in writable)]


def docker(*args: str, check: bool = True) -> str:
    """stdout of one docker command (stripped); CalledProcessError if it fails and `check`."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check).stdout.strip()


def require_image(image: str) -> None:
    """InputError naming the build command unless the Docker engine has `image`."""
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
        raise InputError(f"image {image} not found; build it with scripts/build_image.sh")


def predict_status(port: int, key: str, body: bytes, host: str = "127.0.0.1") -> int:
    """HTTP status of one prediction on the inference port (published on the host's loopback, or
    the container's own on its address); 0 when nothing answered."""
    request = urllib.request.Request(
        f"http://{host}:{port}/predictions/{MODEL_NAME}",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
    )
    try:
        with LOOPBACK.open(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def read_key(container: str, kind: str = "inference") -> str:
    """The `kind` key ("inference", "management"), read the documented way (`docker exec <c> cat
    key_file.json`), or "" while TorchServe has not (completely) written the file."""
    found = subprocess.run(["docker", "exec", container, "cat", "key_file.json"], capture_output=True)
    try:
        return json.loads(found.stdout)[kind]["key"]
    except (ValueError, KeyError):
        return ""


def describe(container: str, host: str, management_port: int = 8081) -> dict[str, Any]:
    """The model as the container's management API describes it (version, batching, workers)."""
    request = urllib.request.Request(
        f"http://{host}:{management_port}/models/{MODEL_NAME}",
        headers={"Authorization": f"Bearer {read_key(container, 'management')}"},
    )
    try:
        with LOOPBACK.open(request, timeout=10) as resp:
            return json.loads(resp.read())[0]
    except (OSError, ValueError, IndexError) as err:
        raise ServeError(f"describing {MODEL_NAME} in {container} failed: {err}") from None


def cgroup_dir(container: str, templates: Sequence[str], what: str) -> Path:
    """The first of `templates` (paths with `{id}`, one per cgroup version and driver) that exists
    for `container`; ServeError when none does."""
    for template in templates:
        path = Path(template.format(id=container))
        if path.is_dir():
            return path
    raise ServeError(f"no {what} cgroup of {container} under /sys/fs/cgroup; run on the Docker host")


def first_prediction(
    container: str, port: int, body: bytes, timeout: float, what: str, host: str = "127.0.0.1"
) -> str:
    """Wait until the container answers a prediction of `body` with 200 on `host`:`port`; return
    its inference key. ServeError naming `what` and `docker logs` after `timeout` s."""

    def answered() -> str | None:
        key = read_key(container)
        return key if key and predict_status(port, key, body, host) == 200 else None

    try:
        return wait_for(answered, timeout, f"a prediction from {what}", interval=0.2)
    except WaitTimeout as err:
        raise ServeError(f"{err}; see `docker logs {container}`") from None


def cold_start(image: str, body: bytes, timeout: float = 180) -> tuple[float, float]:
    """Seconds from `docker run` (hardened) to the first 200, and MiB used after 100 more predictions."""
    start = time.monotonic()
    container = docker("run", "--detach", *hardened_flags(), "--publish=127.0.0.1::8080", image)
    try:
        port = int(docker("port", container, "8080/tcp").rsplit(":", 1)[1])
        key = first_prediction(container, port, body, timeout, image)
        seconds = time.monotonic() - start
        for _ in range(100):
            predict_status(port, key, body)
        stats = json.loads(docker("stats", "--no-stream", "--format", "{{json .}}", container))
        used = stats["MemUsage"].split("/")[0].strip()
        return seconds, float(used[:-3]) * MEMORY_UNITS[used[-3:]]
    finally:
        docker("rm", "--force", container, check=False)


def compressed_size(image: str) -> int:
    """Bytes of `docker save | gzip -6`: about what a node pulls."""
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    gzip = subprocess.run(["gzip", "-6"], stdin=save.stdout, capture_output=True, check=True)
    save.wait()
    return len(gzip.stdout)
