"""Compare this project's server with stock TorchServe, LitServe and the in-process limit, in one run;
write the table, the goals and a plot into docs/serving.md (serving/peers.py says how each is run).

    make bench-peers                                      # creates .venv-peers first, then this
    python -m scripts.bench_peers                         # model_store/fashion_mnist.mar, data/
    python -m scripts.bench_peers --seconds 3 --clients 1 16 --peers project litserve --no-doc

Needs what `make all` builds (model_store/fashion_mnist.mar, whose model file every server runs, and
the processed test set for the PNG), `wrk` (`scripts/setup.sh --dev`) and, for the stock TorchServe and
LitServe peers, the benchmark-only venv .venv-peers (requirements-peers.txt). Exit status: 2 for bad
input (each message names the fix), 1 if a server or a request failed, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from serving import REPO, peers
from serving.docblock import command, write_block
from serving.images import fashion_test_pngs
from serving.server import InputError, ServeError, exit_status
from training.cli import DATA_DIR, MODEL_STORE

DOC = REPO / "docs" / "serving.md"
FIGURE = REPO / "docs" / "figures" / "peers.png"


def config(text: str) -> peers.Config:
    """WORKERS:BATCH:DELAY_MS, e.g. 2:8:5."""
    try:
        workers, batch, delay = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WORKERS:BATCH:DELAY_MS, e.g. 2:8:5") from None
    if workers < 1 or batch < 1 or delay < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: workers and batch must be >= 1, delay >= 0")
    return peers.Config(workers, batch, delay)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_peers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--model-store", type=Path, default=MODEL_STORE, help="holds fashion_mnist.mar: every server's model"
    )
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="processed data (training.data --out)")
    parser.add_argument("--peer-python", type=Path, default=peers.PEER_PYTHON, help="the peer venv's python")
    parser.add_argument("--peers", nargs="+", choices=peers.PEERS, default=list(peers.PEERS))
    parser.add_argument(
        "--clients", nargs="+", type=int, default=[1, 4, 16, 64], help="must include 1 and 16"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk run per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up per config, seconds")
    parser.add_argument(
        "--configs", nargs="+", type=config, default=list(peers.CONFIGS), help="WORKERS:BATCH:DELAY_MS each"
    )
    parser.add_argument("--in-process-seconds", type=float, default=5.0)
    parser.add_argument(
        "--peer-torch-threads",
        type=int,
        default=peers.DEFAULT_THREADS,
        help="torch threads per peer worker, as the project's (%(default)s); 0: torch's default (per core)",
    )
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--no-doc", action="store_true", help="print the block; write neither doc nor figure")
    args = parser.parse_args(argv)
    cmdline = command(["python", "-m", "scripts.bench_peers"], argv if argv is not None else sys.argv[1:])
    try:
        if args.seconds <= 0 or args.warmup <= 0 or min(args.clients) < 1 or args.peer_torch_threads < 0:
            raise InputError(
                "--seconds and --warmup must be > 0, every --clients >= 1, --peer-torch-threads >= 0"
            )
        setup = peers.Setup(
            model_store=args.model_store.resolve(),
            body=b"",
            peer_python=args.peer_python,
            peer_torch_threads=args.peer_torch_threads or None,
            clients=sorted(set(args.clients)),
            seconds=args.seconds,
            warmup_s=args.warmup,
            configs=args.configs,
            peers=args.peers,
            in_process_s=args.in_process_seconds,
        )
        peers.check(setup)
        from training.data import DataError

        try:
            setup.body = fashion_test_pngs(args.data, 1)[0]
        except (DataError, FileNotFoundError) as err:
            raise InputError(f"{err}; run `python -m training.data`") from None
        with tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch:
            results = peers.measure(setup, Path(scratch))
        if args.no_doc:
            print(peers.render(results, cmdline, None))
        else:
            peers.plot(results, args.figure)
            link = os.path.relpath(args.figure.resolve(), args.doc.resolve().parent)
            write_block(args.doc, "bench_peers", peers.render(results, cmdline, link))
            print(f"wrote {args.doc} and {args.figure}")
    except ServeError as err:
        return exit_status(err)
    for goal in peers.goals(results):
        print(f"{'MET    ' if goal.met else 'NOT MET'} {goal.text}: {goal.measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
