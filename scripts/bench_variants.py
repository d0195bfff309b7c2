"""Measure every model variant (latency at batch 1 and 8, test accuracy, load time); write docs/serving.md.

    .venv/bin/python -m scripts.bench_variants                       # artifacts/model, every variant + AOTI
    .venv/bin/python -m scripts.bench_variants --variants fp32 int8 --calls 500 --doc /tmp/serving.md

The logic is archive/measure.py. The table and this exact command replace the block between the
bench_variants markers in the doc; archive/variants.py DEFAULT_VARIANT is chosen from it. Run it on
a quiet machine: the rounds alternate the variants, but a busy machine still widens every p99.
Compiling the AOTInductor package takes a few minutes on 2 cores (leave it out with --variants).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from archive.measure import known_candidates, measure, render
from serving.docblock import DocBlockError, command, machine, write_block
from training.cli import DATA_DIR, EXIT_USAGE, EXPORT_DIR, REPO_ROOT, StageError, run_stage

PROG = "python -m scripts.bench_variants"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export-dir", type=Path, default=EXPORT_DIR, help="output of training.export")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="processed data (training.data --out)")
    candidates = known_candidates()
    parser.add_argument("--variants", nargs="+", choices=candidates, default=candidates, help="to measure")
    parser.add_argument("--calls", type=int, default=1000, help="timed forwards per batch size and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants (>= 1)")
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "serving.md")
    args = parser.parse_args(argv)
    if args.calls < 100 or args.rounds < 1:
        parser.error("need --calls >= 100 (a p99 needs samples) and --rounds >= 1")

    def run() -> None:
        at_start = machine()
        with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
            results = measure(args.export_dir, args.data, Path(tmp), args.variants, args.calls, args.rounds)
        used = sys.argv[1:] if argv is None else argv
        block = render(results, command(PROG.split(), used), at_start, args.calls, args.rounds)
        print(block)
        try:
            write_block(args.doc, "bench_variants", block)
        except DocBlockError as exc:
            raise StageError(str(exc), exit_code=EXIT_USAGE) from None
        print(f"wrote {args.doc}")

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
