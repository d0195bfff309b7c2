"""Measure the serving container's memory under load against the pod's memory limit, and write the
figures into docs/deploy.md.

    scripts/build_image.sh && .venv/bin/python -m scripts.bench_container_memory
    .venv/bin/python -m scripts.bench_container_memory --set job_queue_size=32 --seconds 30

Starts the image hardened as GKE runs it (`hardened_flags` of serving/container.py) with the
memory limit of the `torchserve` container in deploy/base/deployment.yaml, and with TorchServe's
config from `--config` (the image's own by default) plus any `--set KEY=VALUE`, mounted read-only
and named by TS_CONFIG_FILE. Then two loads of `--seconds` each: 28x28 PNGs from 16 closed-loop
clients, and the worst the config admits, PNGs of random RGB noise just under its
max_request_size from job_queue_size + 16 clients (serving/container_memory.py measures and
renders). The figures and this exact command replace the block between the bench markers in
docs/deploy.md. Exit status: 2 for bad input (no such image, a doc without the markers), 1 if
the container or a measurement failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving import REPO
from serving import container_memory as cm
from serving.container import require_image
from serving.docblock import command, write_block
from serving.server import ServeError, exit_status

DOC = REPO / "docs" / "deploy.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="fashion-mnist-serve:dev", help="%(default)s")
    parser.add_argument(
        "--config", type=Path, default=REPO / "docker" / "config.properties", help="%(default)s"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument(
        "--store", type=Path, help="mount this model store (for the image built --target runtime)"
    )
    parser.add_argument("--seconds", type=float, default=20, help="per load (%(default)s)")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.set):
        parser.error("--set takes KEY=VALUE, e.g. --set job_queue_size=32")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    cmdline = command(
        [".venv/bin/python", "-m", "scripts.bench_container_memory"],
        argv if argv is not None else sys.argv[1:],
    )
    try:
        require_image(args.image)
        text, settings = cm.config_text(args.config, args.set)
        figures = cm.measure(args.image, text, settings, args.seconds, args.store)
        block = cm.render(args.image, settings, args.seconds, figures, cmdline)
        write_block(DOC, "bench_container_memory", block)
        print(block)
    except ServeError as err:
        return exit_status(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
