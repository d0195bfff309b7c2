"""Measure the serving image and write the figures into docs/deploy.md.

    scripts/build_image.sh && .venv/bin/python -m scripts.bench_container
    .venv/bin/python -m scripts.bench_container --image fashion-mnist-serve:dev --runs 5

Records the image size (as Docker reports it, and gzip-compressed, which is about what a node
pulls), then starts the image `--runs` times with the hardening GKE uses (serving.container's
`hardened_flags`, the same flags the container tests use) and measures cold start: from
`docker run` to the first prediction answered 200, the key read the documented way
(`docker exec <c> cat key_file.json`). Also the container's memory after 100 predictions. The
figures and this exact command replace the bench_container block of docs/deploy.md. Exit status:
2 if the image does not exist, 1 if a container failed, else 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np
import psutil

from serving import REPO
from serving.container import cold_start, compressed_size, docker, hardened_flags, require_image
from serving.docblock import command, machine, write_block
from serving.images import encode
from serving.server import ServeError, exit_status

DOC = REPO / "docs" / "deploy.md"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_container", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--image", default="fashion-mnist-serve:dev", help="%(default)s")
    parser.add_argument("--runs", type=int, default=5, help="cold starts to time (%(default)s)")
    args = parser.parse_args(argv)
    cmdline = command(
        [".venv/bin/python", "-m", "scripts.bench_container"], argv if argv is not None else sys.argv[1:]
    )
    try:
        require_image(args.image)
        size = int(docker("image", "inspect", "--format", "{{.Size}}", args.image))
        packed = compressed_size(args.image)
        body = encode(np.zeros((28, 28), np.uint8))  # cold start does not depend on the picture
        runs = [cold_start(args.image, body) for _ in range(args.runs)]
        starts = sorted(seconds for seconds, _ in runs)
        median, memory = statistics.median(starts), max(mib for _, mib in runs)
        engine = docker("version", "--format", "{{.Server.Version}}")
        block = "\n".join(
            [
                f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, "
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
                f"Command: `{cmdline}` (after `scripts/build_image.sh`). Cold start runs from `docker run`",
                "to the first 200 from /predictions, with the container hardened as on GKE",
                f"(`{' '.join(hardened_flags())}`).",
            ]
        )
        write_block(DOC, "bench_container", block)
    except ServeError as err:
        return exit_status(err)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
