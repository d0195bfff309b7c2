"""Measure what one serving container holds under each CPU limit, write the figures, a plot and
the CPU request, limit and HPA target they imply into docs/deploy.md.

    scripts/build_image.sh && .venv/bin/python -m scripts.bench_container_load
    .venv/bin/python -m scripts.bench_container_load --cpus 1 2 --clients 1 2 4 8 16 32 --seconds 5
    .venv/bin/python -m scripts.bench_container_load --image fashion-mnist-serve:runtime \\
        --model-store model_store                      # the image built --target runtime

Starts `--image` once per `--cpus` value (`docker run --cpus`), hardened as GKE runs it with the
pod's memory limit and the image's own TorchServe config, and drives it with `wrk` keep-alive
clients at each `--clients` count for `--seconds` (serving/container_load.py measures, chooses and
renders). The capacity at p99 <= 10 ms (`--p99-ms`) per limit, the chosen CPU request = limit and the HPA's
averageUtilization replace the bench_container_load block of docs/deploy.md, with this exact
command; the command then says whether deploy/ still matches. Needs Docker, the image
(`scripts/build_image.sh`), `wrk` and the processed test set (`python -m training.data`).
Exit status: 2 for bad input (each message names the fix), 1 if the container or a run failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from serving import REPO, wrk
from serving import container_load as cl
from serving.bench import GOAL_P99_MS
from serving.container import require_image
from serving.docblock import command, write_block
from serving.images import fashion_test_pngs
from serving.server import InputError, ServeError, exit_status
from training.cli import DATA_DIR

DOC = REPO / "docs" / "deploy.md"
FIGURE = REPO / "docs" / "figures" / "container_load.png"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_container_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--image", default="fashion-mnist-serve:dev", help="%(default)s")
    parser.add_argument(
        "--model-store", type=Path, help="mount this store's fashion_mnist.mar (image built --target runtime)"
    )
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="processed data (training.data --out)")
    parser.add_argument("--cpus", nargs="+", type=float, default=[1.0, 2.0], help="CPU limits (%(default)s)")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32], help="%(default)s")
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk run per point (%(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up per limit (%(default)s)")
    parser.add_argument(
        "--p99-ms",
        type=float,
        default=GOAL_P99_MS,
        help="latency bound of the capacity (%(default)s: issue 12's)",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="%(default)s")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="%(default)s")
    parser.add_argument("--no-doc", action="store_true", help="print the block; write neither doc nor figure")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if any(not 0 < cpus <= cores for cpus in args.cpus):
        parser.error(f"every --cpus must be > 0 and at most this machine's {cores} cores, e.g. --cpus 1 2")
    if min(args.clients) < 1:
        parser.error("every --clients must be >= 1, e.g. --clients 1 2 4 8 16 32")
    if args.seconds <= 0 or args.warmup <= 0 or args.p99_ms <= 0:
        parser.error("--seconds, --warmup and --p99-ms must be > 0")
    cmdline = command(
        [".venv/bin/python", "-m", "scripts.bench_container_load"], argv if argv is not None else sys.argv[1:]
    )
    try:
        wrk.executable()
        if args.model_store is not None:
            cl.check_store(args.model_store)
        require_image(args.image)
        from training.data import DataError  # torch-heavy: after the cheap checks

        try:
            body = fashion_test_pngs(args.data, 1)[0]
        except (DataError, FileNotFoundError) as err:
            raise InputError(f"{err}; run `python -m training.data` or pass --data") from None
        results = cl.measure(
            args.image, body, sorted(set(args.cpus)), sorted(set(args.clients)), args.seconds, args.warmup,
            args.model_store, args.p99_ms,
        )  # fmt: skip
        advice = cl.recommend(results)
        if args.no_doc:
            print(cl.render(results, advice, cmdline, None))
        else:
            cl.plot(results, args.figure)
            link = os.path.relpath(args.figure.resolve(), args.doc.resolve().parent)
            block = cl.render(results, advice, cmdline, link)
            write_block(args.doc, "bench_container_load", block)
            print(f"{block}\n\nwrote {args.doc} and {args.figure}")
    except ServeError as err:
        return exit_status(err)
    if advice is not None:
        request, limit, target = cl.deployed()
        wanted = (advice.quantity, advice.quantity, advice.utilization)
        if (request, limit, target) != wanted:
            print(
                f"deploy/ differs: the torchserve container has cpu request {request}, limit {limit} and "
                f"the HPA averageUtilization {target}; these figures choose {advice.quantity}, "
                f"{advice.quantity} and {advice.utilization} (deploy/base/deployment.yaml, hpa.yaml)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
