"""Measure TorchServe baseline figures and write them into docs/serving.md.

    python -m scripts.bench_serving                      # model_store/fashion_mnist.mar, data/ test images
    python -m scripts.bench_serving --requests 2000 --ab-requests 10000

Needs the archive (`python -m archive.build`), the processed test set (`python -m training.data`) and
`ab` (apache2-utils, installed by `scripts/setup.sh --dev`). It starts its own TorchServe instance
("bench", on free loopback ports; a running default server is left alone) and always stops it.

Figures, each for the archive's own batching settings and for batch_size 1:
  * cold start: `scripts.serve start` -> /ping answers, -> model registered (worker loaded),
    -> first prediction answered (median of --cold-runs fresh servers);
  * latency with 1 client: p50/p99 over --requests sequential keep-alive POSTs of distinct real
    test images (PNG), timed in the client;
  * throughput with 16 clients: `ab -k -c 16` on one PNG.
The figures and the exact command replace the block between the bench markers in docs/serving.md.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from scripts import serve
from training.data import DataError, load_split

REPO = serve.REPO
DOC = REPO / "docs" / "serving.md"
BEGIN, END = "<!-- bench_serving:begin -->", "<!-- bench_serving:end -->"
ANY_PORTS = dict.fromkeys(serve.DEFAULT_PORTS, 0)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def cold_start(instance: serve.Instance, store: Path, image: bytes) -> dict[str, float]:
    """Seconds from `start` to: /ping healthy, model registered, first prediction answered."""
    t0 = time.perf_counter()
    serve.start(instance, store, ANY_PORTS)
    try:
        ready = time.perf_counter() - t0
        client = serve.Client.for_instance(instance)
        client.register()
        registered = time.perf_counter() - t0
        resp = client.predict(image)
        first = time.perf_counter() - t0
        client.close()
        if resp.status_code != 200:
            raise serve.ServeError(f"first prediction failed: HTTP {resp.status_code} {resp.text[:200]}")
    finally:
        serve.stop(instance)
    return {"ready": ready, "registered": registered, "first_prediction": first}


def latency_ms(client: serve.Client, images: list[bytes], requests: int) -> dict[str, float]:
    """p50/p99 of sequential POSTs over one keep-alive connection (after 50 warm-up calls)."""
    url = urlsplit(f"{client.urls['inference']}/predictions/{serve.MODEL_NAME}")
    headers = {
        "Authorization": f"Bearer {client.key('inference')}",
        "Content-Type": "application/octet-stream",
    }
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    samples = []
    try:
        for i in range(requests + 50):
            start = time.perf_counter()
            conn.request("POST", url.path, body=images[i % len(images)], headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise serve.ServeError(f"prediction failed during the latency run: HTTP {resp.status}")
            if i >= 50:
                samples.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()
    q = np.percentile(samples, [50, 99])
    return {"p50": float(q[0]), "p99": float(q[1]), "mean": statistics.fmean(samples)}


def throughput(client: serve.Client, image: Path, requests: int, clients: int = 16) -> dict[str, Any]:
    """`ab -k` requests per second and the failed requests (ab needs keep-alive here).

    ab's "Length" failures are not failures: it flags every body whose length differs from the
    first one's, and probabilities computed in different batches differ in their last digits.
    """
    url = f"{client.urls['inference']}/predictions/{serve.MODEL_NAME}"
    command = [
        "ab", "-k", "-q", "-c", str(clients), "-n", str(requests),
        "-p", str(image), "-T", "application/octet-stream",
        "-H", f"Authorization: Bearer {client.key('inference')}", url,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))
    kinds = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", out)
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    failed = sum(int(n) for n in kinds.groups()) if kinds else 0
    return {"rps": rps, "failed": failed + (int(non_2xx.group(1)) if non_2xx else 0)}


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.machine(),
    )  # fmt: skip
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPU cores ({model}), no GPU; load average at start {load}"


def render(results: dict[str, Any], command: str) -> str:
    cold = results["cold"]
    rows = "\n".join(
        f"| {name} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['rps']:.0f} req/s | {r['failed']} |"
        for name, r in results["settings"].items()
    )
    return f"""{BEGIN}
Measured on {time.strftime("%Y-%m-%d")} with `{command}`
on {results["machine"]}; TorchServe 0.12.0, 1 torch thread per worker.

Cold start (median of {results["cold_runs"]} fresh servers, seconds since `scripts.serve start`):

| JVM answers /ping | model registered (worker loaded) | first prediction answered |
|---|---|---|
| {cold["ready"]:.1f} s | {cold["registered"]:.1f} s | {cold["first_prediction"]:.1f} s |

Steady state ({results["requests"]} sequential requests for latency, `ab -k -c 16 -n {results["ab_requests"]}`
for throughput; PNG-encoded 28x28 test images):

| batching | p50 latency, 1 client | p99 latency, 1 client | throughput, 16 clients | failed |
|---|---|---|---|---|
{rows}
{END}"""


def measure(args: argparse.Namespace, images: list[bytes], results: dict[str, Any]) -> None:
    """Cold starts on fresh servers, then latency and throughput per batching setting, into `results`."""
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        instance = serve.Instance("bench", Path(scratch))
        runs = [cold_start(instance, args.model_store, images[0]) for _ in range(args.cold_runs)]
        results["cold"] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"cold start: {results['cold']}")
        image_file = Path(scratch) / "image.png"
        image_file.write_bytes(images[0])
        serve.start(instance, args.model_store, ANY_PORTS)
        try:
            client = serve.Client.for_instance(instance)
            for label, settings in (("archive", {}), ("batch 1", {"batch_size": 1, "max_batch_delay": 0})):
                client.register(**settings)
                described = client.describe()[0]
                name = (
                    f"batchSize {described['batchSize']}, maxBatchDelay {described['maxBatchDelay']} ms, "
                    f"{len(described['workers'])} worker"
                    + (" (the archive's settings)" if label == "archive" else "")
                )
                figures = latency_ms(client, images, args.requests)
                figures |= throughput(client, image_file, args.ab_requests)
                results["settings"][name] = figures
                print(f"{name}: {figures}")
                client.unregister()
            client.close()
        finally:
            serve.stop(instance)


def write_doc(doc: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between the `begin` and `end` markers of `doc` (markers included)."""
    text = doc.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} lacks the {begin} ... {end} markers; add them where the figures go")
    head, rest = text.split(begin, 1)
    doc.write_text(head + block + rest.split(end, 1)[1], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_serving",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store")
    parser.add_argument(
        "--data", type=Path, default=REPO / "data", help="processed data (training.data --out)"
    )
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests for latency")
    parser.add_argument("--ab-requests", type=int, default=5000, help="requests for the ab throughput run")
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if shutil.which("ab") is None:
        raise SystemExit("ab not found: install apache2-utils (`scripts/setup.sh --dev`)")
    if not (args.model_store / f"{serve.MODEL_NAME}.mar").is_file():
        raise SystemExit(
            f"{args.model_store}/{serve.MODEL_NAME}.mar not found: run `python -m archive.build`"
        )
    try:
        split = load_split(args.data, "test")
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    images = [png(image) for image in split.images[:200].numpy()]
    command = shlex.join(
        ["python", "-m", "scripts.bench_serving", *(argv if argv is not None else sys.argv[1:])]
    )
    results: dict[str, Any] = {
        "machine": machine(), "requests": args.requests, "ab_requests": args.ab_requests,
        "cold_runs": args.cold_runs, "settings": {},
    }  # fmt: skip

    try:
        measure(args, images, results)
    except serve.ServeError as err:
        raise SystemExit(f"error: {err}") from None
    write_doc(args.doc, render(results, command))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
