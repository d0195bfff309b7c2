"""Measure how fast the training DataLoader delivers images for 0, 1 and 2 workers; write docs/training.md.

    .venv/bin/python -m scripts.bench_loading                      # real data from `python -m training.data`
    .venv/bin/python -m scripts.bench_loading --workers 0 2 --epochs 4 --doc /tmp/training.md

Loading alone: the training split goes through `training.loading.make_loader` (the loader training
uses) with no model, with and without augmentation (training/bench.py measures and renders). The
figures and this exact command replace the block between the bench_loading markers in the doc (exit
2 if the doc has none); `data.num_workers` in training/config.py is chosen from them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.docblock import command
from training import bench
from training.cli import DATA_DIR, REPO_ROOT, run_stage
from training.data import load_split

PROG = "python -m scripts.bench_loading"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="processed data (training.data --out)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to measure")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (>= 2)")
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "training.md")
    args = parser.parse_args(argv)
    if args.epochs < 2 or min(args.workers) < 0:
        parser.error("need --epochs >= 2 and --workers >= 0")

    def report(r: dict) -> None:
        print(
            f"workers={r['num_workers']} augment={r['augment']}: first epoch "
            f"{r['first_epoch_images_per_s']:,} images/s, later {r['steady_images_per_s']:,} images/s"
        )

    def run() -> None:
        train = load_split(args.data, "train")
        results = bench.loading(train.images, train.labels, args.workers, args.epochs, report)
        cmdline = command(PROG.split(), sys.argv[1:] if argv is None else argv)
        bench.write_figures(args.doc, "bench_loading", bench.render_loading(results, cmdline))

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
