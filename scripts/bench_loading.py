"""Measure how fast the training DataLoader delivers images for 0, 1 and 2 workers; write docs/training.md.

    .venv/bin/python -m scripts.bench_loading                      # real data from `python -m training.data`
    .venv/bin/python -m scripts.bench_loading --workers 0 2 --epochs 4 --doc /tmp/training.md

Loading alone: the training split goes through `training.loading.make_loader` (the loader training
uses) with no model, with and without augmentation. The figures and this exact command replace the
block between the bench_loading markers in the doc (appended if the doc has none); `data.num_workers`
in training/config.py is chosen from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from serving.docblock import DocBlockError, write_block
from training.cli import DATA_DIR, EXIT_USAGE, REPO_ROOT, StageError, run_stage
from training.config import DataConfig, TrainerConfig
from training.data import load_split
from training.loading import throughput

PROG = "python -m scripts.bench_loading"


def render(results: list[dict], argv: list[str], batch_size: int, threads: int) -> str:
    rows = "\n".join(
        f"| {r['num_workers']} | {'flip + shift' if r['augment'] else 'none'} "
        f"| {r['first_epoch_images_per_s']:,} | {r['steady_images_per_s']:,} |"
        for r in results
    )
    fastest = {
        augment: max((r for r in results if r["augment"] == augment), key=lambda r: r["steady_images_per_s"])
        for augment in (False, True)
    }
    load = os.getloadavg()[0]

    def workers(row: dict) -> str:
        return f"{row['num_workers']} worker" + ("" if row["num_workers"] == 1 else "s")

    return f"""## Data loading

Measured by `{shlex.join([*PROG.split(), *argv])}` on {time.strftime("%Y-%m-%d")}, {os.cpu_count()} CPU
cores ({platform.machine()}), torch {torch.__version__}, load average {load:.1f} at the end: images/s of
the training loader alone (no model), batch size {batch_size}, {results[0]["images"]:,} training images,
persistent workers, {threads} torch threads in the main process as in training. The first epoch
includes starting the workers.

| `data.num_workers` | augmentation | first epoch (images/s) | later epochs (images/s) |
|---|---|---|---|
{rows}

Fastest in later epochs: {workers(fastest[False])} without augmentation, {workers(fastest[True])} with it.
With 0 workers the batches are gathered and augmented in the training process, whose torch ops are
multi-threaded: on small tensors the thread hand-offs cost more than the work, badly so on a busy
machine. A worker runs single-threaded and beside the training threads. `data.persistent_workers` and
`data.prefetch_factor` apply once `data.num_workers` is above 0; training/config.py says which default
these figures led to, and why."""


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

    def run() -> None:
        train = load_split(args.data, "train")
        base, threads = DataConfig(), TrainerConfig().threads
        torch.set_num_threads(threads)  # what training.train sets for the process that gathers batches
        results = []
        for augment in (False, True):
            for workers in args.workers:
                cfg = dataclasses.replace(base, augment=augment, num_workers=workers)
                results.append(throughput(train.images, train.labels, cfg, args.epochs))
                r = results[-1]
                print(
                    f"workers={workers} augment={augment}: first epoch {r['first_epoch_images_per_s']:,} "
                    f"images/s, later {r['steady_images_per_s']:,} images/s"
                )
        used = sys.argv[1:] if argv is None else argv
        try:
            write_block(args.doc, "bench_loading", render(results, used, base.batch_size, threads))
        except DocBlockError as exc:
            raise StageError(str(exc), exit_code=EXIT_USAGE) from None
        print(f"wrote {args.doc}")

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
