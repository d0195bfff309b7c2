"""Soak TorchServe: hold it at ~80% of its measured capacity for N minutes and watch errors, latency
and memory (serving/soak.py says how).

    python -m scripts.soak                                  # 5 minutes; updates docs/reliability.md
    python -m scripts.soak --minutes 1 --no-doc             # a quick look, docs untouched
    python -m scripts.soak --minutes 0.5 --synthetic-images --model-store S --report r.json --no-doc

Needs the archive (`python -m archive.build`) and, unless --synthetic-images, the processed test set
(`python -m training.data`). It starts its own TorchServe instance ("soak", free loopback ports, a
temporary state directory; a running default server is left alone), registers the archive with its
own batching settings and always stops the server at the end.

It prints a summary and writes a JSON report (--report), a plot of RSS over time (--figure,
docs/figures/soak_rss.png) and, unless --no-doc, the figures and the exact command into the soak
block of docs/reliability.md. Exit status: 2 for bad input (no archive, no data), 1 if the server
failed or any request failed (warm-up included) or a worker was replaced, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from serving import MODEL_NAME, REPO
from serving.client import Client
from serving.docblock import command, write_block
from serving.images import fashion_test_pngs, noise_pngs
from serving.server import ANY_PORTS, InputError, Instance, ServeError, exit_status, start, stop
from serving.soak import SoakResult, render, soak
from training.cli import DATA_DIR, MODEL_STORE

DOC = REPO / "docs" / "reliability.md"
FIGURE = REPO / "docs" / "figures" / "soak_rss.png"
IMAGES = 256


def load_bodies(data: Path | None) -> list[bytes]:
    """Request bodies: the first test images of the processed data, or random noise if data is None."""
    if data is None:
        return noise_pngs(IMAGES)
    from training.data import DataError

    try:
        return fashion_test_pngs(data, IMAGES)
    except (DataError, FileNotFoundError) as exc:
        raise InputError(f"{exc}; run `python -m training.data` or pass --synthetic-images") from None


def plot(result: SoakResult, figure: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    memory = result.memory
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(memory["times"], memory["jvm_mb"], label="JVM (frontend)")
    for pid, series in memory["workers_mb"].items():
        ax.plot([t for t, _ in series], [mb for _, mb in series], label=f"worker pid {pid}")
    ax.axvline(0, color="grey", linestyle="--", linewidth=1, label="end of warm-up, start of the soak")
    ax.set_xlabel("seconds since the soak started (before 0: warm-up at the same rate)")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="processed data (training.data)")
    parser.add_argument(
        "--synthetic-images", action="store_true", help="random-noise PNGs instead of the test set"
    )
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--sample-seconds", type=float, default=1.0, help="RSS sampling interval")
    parser.add_argument(
        "--max-warmup-seconds", type=float, default=120.0, help="limit on the warm-up before the soak"
    )
    parser.add_argument(
        "--state-dir", type=Path, help="where the soak server's instance lives (default: a temp dir)"
    )
    parser.add_argument("--report", type=Path, help="write the full result as JSON here")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true", help="leave the doc alone")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmdline = command(["python", "-m", "scripts.soak"], argv if argv is not None else sys.argv[1:])
    try:
        archive = args.model_store / f"{MODEL_NAME}.mar"
        if not archive.is_file():
            raise InputError(f"{archive} not found: build it with `python -m archive.build`")
        bodies = load_bodies(None if args.synthetic_images else args.data)
        with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
            instance = Instance("soak", args.state_dir or Path(scratch))
            server = start(instance, args.model_store, ANY_PORTS)
            try:
                client = Client.for_instance(instance)
                client.register()
                result = soak(
                    client, server.pid, bodies, args.minutes, args.load, args.clients,
                    args.capacity_seconds, args.max_warmup_seconds, args.sample_seconds,
                )  # fmt: skip
            finally:
                stop(instance)
        print(json.dumps({k: v for k, v in asdict(result).items() if k != "memory"}, indent=2))
        if args.report:
            report = {"command": cmdline, **asdict(result)}
            args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        title = (
            f"{result.target_rps:.0f} req/s ({result.load:.0%} of the measured {result.capacity_rps:.0f}) "
            f"for {args.minutes:g} min: RSS over time"
        )
        plot(result, args.figure, title)
        print(f"figure: {args.figure}")
        if not args.no_doc:
            write_block(args.doc, "soak", render(result, cmdline, args.figure, args.doc))
            print(f"updated {args.doc}")
    except ServeError as err:
        return exit_status(err)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
