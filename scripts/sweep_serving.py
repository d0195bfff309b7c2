"""Sweep workers x batch size x max batch delay x torch threads x netty threads of the project's
server at several client counts; write the table into docs/serving.md (serving/sweep.py says how).

    python -m scripts.sweep_serving                      # the default grid (32 points), about 12 minutes
    python -m scripts.sweep_serving --workers 1 --batch-sizes 8 --delays 0 1 2 5 --seconds 5
    python -m scripts.sweep_serving --clients 1 16 --seconds 2 --no-doc      # a quick look

Needs the archive (`make archive`), the processed test set for the PNG (`python -m training.data`)
and `wrk` (`scripts/setup.sh --dev`). It starts its own servers ("sweep", free loopback ports) and
always stops them. Exit status: 2 for bad input (the message names the fix), 1 if a server or a
request failed, else 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from serving import MODEL_NAME, REPO, sweep, wrk
from serving.docblock import command, machine, write_block
from serving.images import fashion_test_pngs
from serving.server import InputError, ServeError, exit_status
from training.cli import DATA_DIR, MODEL_STORE

DOC = REPO / "docs" / "serving.md"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.sweep_serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE, help="holds fashion_mnist.mar")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="processed data (training.data --out)")
    parser.add_argument("--workers", nargs="+", type=positive, default=[1, 2])
    parser.add_argument("--batch-sizes", nargs="+", type=positive, default=[1, 8])
    parser.add_argument(
        "--delays", nargs="+", type=non_negative, default=[0, 1, 5], help="max batch delay, ms"
    )
    parser.add_argument("--torch-threads", nargs="+", type=positive, default=[1, 2], help="per worker")
    parser.add_argument("--netty-threads", nargs="+", type=positive, default=[1, 2])
    parser.add_argument("--clients", nargs="+", type=positive, default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="wrk run per point and client count")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true", help="print the table instead of writing the doc")
    args = parser.parse_args(argv)
    cmdline = command(["python", "-m", "scripts.sweep_serving"], argv if argv is not None else sys.argv[1:])
    try:
        if args.seconds <= 0:
            raise InputError(f"--seconds must be > 0, got {args.seconds}")
        if not (args.model_store / f"{MODEL_NAME}.mar").is_file():
            raise InputError(f"{args.model_store}/{MODEL_NAME}.mar not found: build it with `make archive`")
        wrk.executable()
        from training.data import DataError

        try:
            body = fashion_test_pngs(args.data, 1)[0]
        except (DataError, FileNotFoundError) as err:
            raise InputError(f"{err}; run `python -m training.data`") from None
        points = sweep.grid(
            args.workers, args.batch_sizes, args.delays, args.torch_threads, args.netty_threads
        )
        print(f"{len(points)} points x {len(args.clients)} client counts x {args.seconds:g} s")
        host = machine()
        with tempfile.TemporaryDirectory(prefix="sweep-serving-") as scratch:
            results = sweep.run(
                args.model_store.resolve(),
                body,
                points,
                sorted(set(args.clients)),
                args.seconds,
                Path(scratch),
            )
        block = sweep.render(results, cmdline, host, args.seconds)
        if args.no_doc:
            print(block)
        else:
            write_block(args.doc, "sweep_serving", block)
            print(f"wrote {args.doc}")
    except ServeError as err:
        return exit_status(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
