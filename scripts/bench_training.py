"""Measure training figures and write them to docs/training.md (with the training-curve plot).

    .venv/bin/python -m scripts.bench_training                       # default + experiment=accurate
    .venv/bin/python -m scripts.bench_training --only default        # just the default config

For each config it runs the real CLIs (`python -m training.train`, then
`python -m training.export` into a scratch dir) and records: data preparation time,
training wall-clock, time per epoch, peak RSS of the training process, parameter
count, validation and test accuracy (training/bench.py measures and renders). Test accuracy
comes from the exported model, the one that gets served.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from serving.docblock import command
from training import bench
from training.cli import REPO_ROOT, run_stage

PROG = "python -m scripts.bench_training"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", choices=sorted(bench.CONFIGS), action="append", help="bench only these configs"
    )
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "training.md")
    args = parser.parse_args(argv)

    def run() -> None:
        figures = args.doc.parent / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        saved = figures / "training_results.json"
        # --only re-measures some configs and keeps the others' last figures.
        previous = json.loads(saved.read_text()) if saved.is_file() and args.only else {"results": []}
        prep, _ = bench.run_measured([sys.executable, "-m", "training.data", "--force"])
        with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
            fresh = {
                n: bench.bench_config(n, bench.CONFIGS[n], Path(scratch)) for n in args.only or bench.CONFIGS
            }
        results = bench.merge_results(fresh, previous["results"])
        bench.plot(results, figures / "training_curves.png")
        old = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else ""
        cmdline = command(PROG.split(), sys.argv[1:] if argv is None else argv)
        args.doc.write_text(bench.render_training(results, prep, cmdline, old), encoding="utf-8")
        saved.write_text(json.dumps({"results": results}, indent=1) + "\n")
        print(f"wrote {args.doc}")

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
