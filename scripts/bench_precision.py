"""Measure training in fp32 against bf16 mixed precision on this CPU; write the figures to docs/training.md.

    .venv/bin/python -m scripts.bench_precision                      # 300 steps per precision
    .venv/bin/python -m scripts.bench_precision --steps 100 --data-root /tmp/fm

Trains the default config (python -m training.train) for the same number of steps once per
precision, in one process, alternating the order over --rounds so a change in machine load
hits both alike, and records training images/s (steps after the first 10, validation excluded)
and validation accuracy after the steps (training/bench.py measures and renders). The machine may
be shared: compare the ratio, which is measured under the same conditions, rather than the absolute
rates. Replaces the block between the bench_precision markers in docs/training.md (exit 2 if the
doc has none) and leaves the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from serving.docblock import command
from training import bench
from training.cli import DATA_DIR, REPO_ROOT, run_stage
from training.config import register_configs

PROG = "python -m scripts.bench_precision"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (> 10)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per precision, alternating the order")
    parser.add_argument("--data-root", type=Path, default=DATA_DIR, help="processed data (data.root)")
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "training.md")
    args = parser.parse_args(argv)
    if args.steps <= bench.WARMUP_STEPS or args.rounds < 1:
        parser.error(f"--steps must exceed {bench.WARMUP_STEPS} and --rounds be at least 1")

    def report(r: dict) -> None:
        print(f"{r['precision']}: {r['images_per_s']:.0f} images/s, val acc {r['val_acc']:.4f}")

    def run() -> None:
        register_configs()
        with tempfile.TemporaryDirectory(prefix="bench-precision-") as scratch:
            results = bench.precisions(args.steps, args.rounds, args.data_root, Path(scratch), report)
        cmdline = command(["python", "-m", "scripts.bench_precision"], sys.argv[1:] if argv is None else argv)
        bench.write_figures(args.doc, "bench_precision", bench.render_precision(results, args.steps, cmdline))

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
