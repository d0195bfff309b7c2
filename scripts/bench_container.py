"""Measure the serving image and write the figures into docs/deploy.md.

    scripts/build_image.sh && .venv/bin/python scripts/bench_container.py
    .venv/bin/python scripts/bench_container.py --image fashion-mnist-serve:dev --runs 5

Records the image size (as Docker reports it, and gzip-compressed, which is about what a node
pulls), then starts the image `--runs` times with the hardening GKE uses (`HARDENING`, the same
flags the container tests use) and measures cold start: from `docker run` to the first
prediction answered 200, the key read the documented way (`docker exec <c> cat key_file.json`).
Also the container's memory after 100 predictions. The figures and this exact command replace the
block between the bench markers in docs/deploy.md.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "deploy.md"
START, END = "<!-- bench_container:start -->", "<!-- bench_container:end -->"
UID = 10001
# Writable directories of the serving image (Dockerfile): TorchServe's temp dir and its HOME.
WRITABLE = ("/tmp", "/home/model-server")
MEMORY_UNITS = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}


def hardened_flags(memory: str = "1g", writable: tuple[str, ...] = WRITABLE) -> list[str]:
    """What GKE enforces (deploy/base/deployment.yaml) as `docker run` flags: a read-only root with
    tmpfs where the image writes, non-root, no capabilities, no privilege gain, a memory limit.
    The container tests run the image with these flags too."""
    flags = ["--read-only", f"--user={UID}:{UID}", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
    return [*flags, f"--memory={memory}", *(f"--tmpfs={path}:uid={UID},gid={UID}" for path in writable)]


def docker(*args: str, check: bool = True) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check).stdout.strip()


def blank_png() -> bytes:
    """A 28x28 black PNG (cold start does not depend on the picture)."""
    png = io.BytesIO()
    Image.new("L", (28, 28)).save(png, format="PNG")
    return png.getvalue()


def predict(port: int, key: str, body: bytes) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predictions/fashion_mnist",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def read_key(container: str) -> str:
    """The inference key, or "" while TorchServe has not (completely) written key_file.json."""
    found = subprocess.run(["docker", "exec", container, "cat", "key_file.json"], capture_output=True)
    try:
        return json.loads(found.stdout)["inference"]["key"]
    except (ValueError, KeyError):
        return ""


def cold_start(image: str, body: bytes, timeout: float = 180) -> tuple[float, float]:
    """Seconds from `docker run` to the first 200, and MiB used after 100 more predictions."""
    start = time.monotonic()
    container = docker("run", "--detach", *hardened_flags(), "--publish=127.0.0.1::8080", image)
    try:
        port = int(docker("port", container, "8080/tcp").rsplit(":", 1)[1])
        key, status = "", 0
        while status != 200:
            if time.monotonic() - start > timeout:
                raise SystemExit(f"no prediction within {timeout} s; docker logs {container}")
            key = key or read_key(container)
            status = predict(port, key, body) if key else 0
        seconds = time.monotonic() - start
        for _ in range(100):
            predict(port, key, body)
        stats = json.loads(docker("stats", "--no-stream", "--format", "{{json .}}", container))
        used = stats["MemUsage"].split("/")[0].strip()
        unit = used[-3:]
        return seconds, float(used[:-3]) * MEMORY_UNITS[unit]
    finally:
        docker("rm", "--force", container, check=False)


def compressed_size(image: str) -> int:
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    gzip = subprocess.run(["gzip", "-6"], stdin=save.stdout, capture_output=True, check=True)
    save.wait()
    return len(gzip.stdout)


def write_doc(block: str, start: str = START, end: str = END) -> None:
    """Replace what lies between the `start` and `end` markers of docs/deploy.md with `block`."""
    text = DOC.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} lacks the {start} ... {end} markers; restore them from git")
    head, rest = text.split(start, 1)
    DOC.write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="fashion-mnist-serve:dev", help="%(default)s")
    parser.add_argument("--runs", type=int, default=5, help="cold starts to time (%(default)s)")
    args = parser.parse_args(argv)
    if subprocess.run(["docker", "image", "inspect", args.image], capture_output=True).returncode:
        raise SystemExit(f"image {args.image} not found; build it with scripts/build_image.sh")

    size = int(docker("image", "inspect", "--format", "{{.Size}}", args.image))
    packed = compressed_size(args.image)
    body = blank_png()
    runs = [cold_start(args.image, body) for _ in range(args.runs)]
    starts = sorted(seconds for seconds, _ in runs)
    memory = max(mib for _, mib in runs)
    median = statistics.median(starts)
    command = shlex.join([".venv/bin/python", "scripts/bench_container.py", *(argv or sys.argv[1:])])
    engine = docker("version", "--format", "{{.Server.Version}}")
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in cpuinfo.read_text().splitlines()
        if line.startswith("model name")
    ]
    cpu = names[0] if names else platform.machine()
    block = "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} on {psutil.cpu_count()} cores ({cpu}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Docker {engine}, image `{args.image}`:",
            "",
            "| figure | value |",
            "|---|---|",
            f"| image size (`docker image inspect`) | {size / 1e9:.2f} GB |",
            f"| image size, gzip-compressed (`docker save \\| gzip`) | {packed / 1e9:.2f} GB |",
            f"| cold start to first prediction, median of {len(starts)} | {median:.1f} s |",
            f"| cold start, fastest / slowest | {starts[0]:.1f} s / {starts[-1]:.1f} s |",
            f"| container memory after 100 predictions (1 worker) | {memory:.0f} MiB |",
            "",
            f"Command: `{command}` (after `scripts/build_image.sh`). Cold start runs from `docker run`",
            "to the first 200 from /predictions, with the container hardened as on GKE",
            f"(`{' '.join(hardened_flags())}`).",
        ]
    )
    write_doc(block)
    print(block)


if __name__ == "__main__":
    main()
