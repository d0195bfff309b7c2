"""Measure what model monitoring costs: throughput at 16 clients with it on and off, side by side.

    python -m scripts.bench_monitoring                        # model_store/fashion_mnist.mar
    python -m scripts.bench_monitoring --rounds 5 --seconds 20

Starts its own TorchServe ("bench-monitoring", free loopback ports) once per run, with
FASHION_MONITORING=on or off in its environment (handler/monitor.py), registers the archive with its
own batching settings, warms it up and runs `wrk` with 16 keep-alive clients on a PNG test image
(monitoring/overhead.py).
On and off runs alternate for --rounds rounds, so a change in the machine's load hits both alike; the
medians and their ratio, with every run's figure and the exact command, replace the block between the
bench markers in docs/monitoring.md. Needs the archive, the processed test set
(`python -m training.data`) and `wrk` (Debian package wrk, `scripts/setup.sh --dev`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from monitoring import overhead
from serving import MODEL_NAME, REPO, wrk
from serving.docblock import command, write_block
from serving.images import encode as png
from serving.server import ServeError
from training.data import DataError, load_split

PROG = "python -m scripts.bench_monitoring"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store")
    parser.add_argument(
        "--data", type=Path, default=REPO / "data", help="processed data (training.data --out)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="on/off pairs")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk run per server")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "monitoring.md")
    args = parser.parse_args(argv)
    try:
        wrk.executable()  # fails now, with the fix, rather than after the first server start
    except ServeError as err:
        raise SystemExit(f"error: {err}") from None
    if not (args.model_store / f"{MODEL_NAME}.mar").is_file():
        raise SystemExit(f"{args.model_store}/{MODEL_NAME}.mar not found: run `python -m archive.build`")
    try:
        image = png(load_split(args.data, "test").images[0].numpy())
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    cmdline = command(PROG.split(), argv if argv is not None else sys.argv[1:])
    try:
        with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as scratch:
            results = overhead.compare(args.model_store, image, args.rounds, args.seconds, Path(scratch))
    except ServeError as err:
        raise SystemExit(f"error: {err}") from None
    write_block(args.doc, "bench_monitoring", overhead.render(results, cmdline))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
