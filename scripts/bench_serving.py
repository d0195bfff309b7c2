"""Measure TorchServe baseline figures and write them into docs/serving.md (serving/bench.py says which).

    python -m scripts.bench_serving                      # model_store/fashion_mnist.mar, data/ test images
    python -m scripts.bench_serving --seconds 20 --cold-runs 5

Needs the archive (`python -m archive.build`), the processed test set (`python -m training.data`) and
`wrk` (Debian package wrk, installed by `scripts/setup.sh --dev`). It starts its own TorchServe instance
("bench", on free loopback ports; a running default server is left alone) and always stops it.
The figures and the exact command replace the bench_serving block of docs/serving.md. Exit status:
2 for bad input (no archive, no data, no wrk), 1 if the server or a request failed, else 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from serving import MODEL_NAME, REPO, wrk
from serving.bench import measure, render
from serving.docblock import command, write_block
from serving.images import fashion_test_pngs
from serving.server import InputError, ServeError, exit_status
from training.cli import DATA_DIR, MODEL_STORE

DOC = REPO / "docs" / "serving.md"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="processed data (training.data --out)")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk run per setting and client count")
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    cmdline = command(["python", "-m", "scripts.bench_serving"], argv if argv is not None else sys.argv[1:])
    try:
        if not (args.model_store / f"{MODEL_NAME}.mar").is_file():
            raise InputError(f"{args.model_store}/{MODEL_NAME}.mar not found: run `python -m archive.build`")
        wrk.executable()  # fails now, with the fix, rather than after the cold starts
        from training.data import DataError

        try:
            body = fashion_test_pngs(args.data, 1)[0]
        except (DataError, FileNotFoundError) as err:
            raise InputError(f"{err}; run `python -m training.data`") from None
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
            results = measure(args.model_store, body, args.seconds, args.cold_runs, Path(scratch))
        write_block(args.doc, "bench_serving", render(results, cmdline))
    except ServeError as err:
        return exit_status(err)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
