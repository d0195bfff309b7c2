"""Accuracy of the exported model under a fixed set of input shifts, and what the drift monitor sees.

    python -m monitoring.robustness                        # artifacts/model on the full test set of data/
    python -m monitoring.robustness --limit 2000           # a seeded subsample: a few minutes on 2 cores
    python -m monitoring.robustness --model-dir M --data D --out reports --no-doc

For every shift in monitoring.shifts and each of its severities (severity 0 is the clean test
set) it records the accuracy, the mean top-1 confidence and low-confidence share, the PSI of each
input feature that the online detector would compute over that traffic (monitoring.detector: the
InputDrift rule's bins and formula) and how many such requests the detector's window needs for
the InputDrift condition to hold from then on. Writes OUT/robustness.json and OUT/robustness.png;
unless --no-doc it also copies the plot to docs/figures/ and replaces the table between the
robustness markers in docs/monitoring.md with the figures and the exact command. Exit status:
0, or 2 with a message naming the missing export or data and the command that creates it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from handler import monitor
from handler.preprocess import PreprocessSpec, normalize
from handler.variants import EXPORTED_VARIANT, load_model
from monitoring import detector
from monitoring.rules import RulesError, Thresholds
from monitoring.shifts import SHIFTS
from serving.docblock import write_block
from training.cli import add_model_and_data
from training.data import DataError, load_split

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "monitoring.md"
FIGURE = REPO / "docs" / "figures" / "robustness.png"
BATCH = 1000


def evaluate(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    spec: PreprocessSpec,
    mspec: monitor.MonitorSpec,
    ref: dict[str, Any],
    limits: Thresholds,
    order: np.ndarray,
) -> dict[str, Any]:
    """Scores of one batch of (possibly shifted) uint8 images; `order` is the request stream's order."""
    x = normalize(torch.from_numpy(images), spec)
    with torch.inference_mode():
        probs = torch.cat([torch.softmax(model(x[i : i + BATCH]), dim=1) for i in range(0, len(x), BATCH)])
    confidence, top1 = probs.max(dim=1)
    bins = detector.feature_bins(monitor.input_stats(x, spec), mspec)
    psi = detector.feature_psi(bins, ref)
    stream = {name: b[torch.from_numpy(order)] for name, b in bins.items()}
    return {
        "accuracy": float((top1 == torch.from_numpy(labels)).double().mean()),
        "mean_confidence": float(confidence.double().mean()),
        "low_confidence_share": float((confidence < limits.low_confidence_below).double().mean()),
        "psi": {name: round(value, 6) for name, value in psi.items()},
        "psi_max": round(max(psi.values()), 6),
        "requests_to_alert": detector.requests_to_alert(stream, ref, limits),
    }


def measure(model_dir: Path, data: Path, limit: int | None, seed: int, limits: Thresholds) -> dict[str, Any]:
    """Run every shift at every severity on the test split (or a seeded subsample of `limit` images)."""
    meta, ref, spec, mspec = detector.export_specs(model_dir)
    model = load_model(model_dir / "model.pt", meta.get("variant", EXPORTED_VARIANT))
    test = load_split(data, "test")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(test))[:limit]) if limit else np.arange(len(test))
    images, labels = test.images.numpy()[keep], test.labels.numpy()[keep]
    # One request order for every shift: traffic arrives shuffled, not sorted like the test file.
    order = rng.permutation(len(images))
    shifts = []
    with tqdm(total=sum(len(s.levels) for s in SHIFTS.values()), desc="shifts", unit="run") as bar:
        for number, shift in enumerate(SHIFTS.values()):
            rows = []
            for severity, level in enumerate(shift.levels):
                bar.set_postfix_str(f"{shift.name} {level}")
                # A generator per (shift, severity): any one run reproduces without the others.
                shifted, truth = shift.apply(
                    images, labels, level, np.random.default_rng([seed, number, severity])
                )
                scores = evaluate(model, shifted, truth, spec, mspec, ref, limits, order)
                rows.append({"severity": severity, "level": level, **scores})
                bar.update()
            shifts.append({"name": shift.name, "unit": shift.unit, "results": rows})
    return {
        "model": {"name": meta["name"], "version": str(meta["version"]), "dir": str(model_dir)},
        "images": len(images),
        "seed": seed,
        "thresholds": {"psi": limits.psi, "min_requests": limits.min_requests},
        "clean_accuracy": shifts[0]["results"][0]["accuracy"],
        "shifts": shifts,
    }


def plot(results: dict[str, Any], figure: Path) -> None:
    """Accuracy and worst-feature PSI against severity, one line per shift; caught levels are filled."""
    fig, (acc_ax, psi_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for shift in results["shifts"]:
        rows = shift["results"]
        severity = [r["severity"] for r in rows]
        (line,) = acc_ax.plot(severity, [r["accuracy"] for r in rows], marker="o", label=shift["name"])
        psi_ax.plot(severity, [max(r["psi_max"], 1e-4) for r in rows], color=line.get_color(), alpha=0.6)
        for r in rows:
            caught = r["requests_to_alert"] is not None
            psi_ax.plot(
                r["severity"],
                max(r["psi_max"], 1e-4),
                marker="o",
                color=line.get_color(),
                markerfacecolor=line.get_color() if caught else "white",
            )
    acc_ax.set(xlabel="severity (0 = clean)", ylabel="accuracy", ylim=(0, 1), title="Accuracy under shift")
    acc_ax.legend(fontsize=8)
    psi_ax.axhline(results["thresholds"]["psi"], color="black", linestyle="--", label="InputDrift threshold")
    psi_ax.set(
        xlabel="severity (0 = clean)",
        ylabel="worst input-feature PSI",
        yscale="log",
        title="What the drift monitor sees (filled: alert condition reached)",
    )
    psi_ax.legend(fontsize=8)
    fig.suptitle(
        f"{results['model']['name']} {results['model']['version']} on {results['images']} test images"
    )
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def render(results: dict[str, Any], command: str, figure: Path, doc: Path) -> str:
    """The markdown block for docs/monitoring.md: the figures, the plot and the command."""
    clean = results["clean_accuracy"]
    lines = [
        "| shift | level | accuracy | change | worst PSI (feature) | requests to alert |",
        "|---|---|---|---|---|---|",
        f"| none (clean) | | {clean:.1%} | | {results['shifts'][0]['results'][0]['psi_max']:.3f} | |",
    ]
    for shift in results["shifts"]:
        for r in shift["results"][1:]:
            feature = max(r["psi"], key=r["psi"].get)
            caught = r["requests_to_alert"]
            lines.append(
                f"| {shift['name']} ({shift['unit']}) | {r['level']:g} | {r['accuracy']:.1%} "
                f"| {(r['accuracy'] - clean) * 100:+.1f} pt | {r['psi_max']:.3f} ({feature}) "
                f"| {caught if caught is not None else 'not caught'} |"
            )
    link = os.path.relpath(figure, doc.parent)
    table = "\n".join(lines)
    limits = results["thresholds"]
    return f"""Measured on {time.strftime("%Y-%m-%d")} with `{command}`
on {results["images"]} test images of model {results["model"]["name"]} {results["model"]["version"]}.
"Requests to alert" is the number of such
requests, in a shuffled order, the rule's window must hold for some feature's PSI to exceed
{limits["psi"]} from then on, with at least {limits["min_requests"]} requests in the window; "not
caught" means not over all {results["images"]} requests.

![Accuracy and PSI under each shift]({link})

{table}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.robustness", description=__doc__.split("\n\n")[0]
    )
    add_model_and_data(parser)
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="where robustness.json/.png go")
    parser.add_argument("--limit", type=int, help="evaluate a seeded subsample of this many test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-requests",
        type=int,
        default=Thresholds.min_requests,
        help="the InputDrift rule's minimum window size (monitoring.rules --min-requests)",
    )
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--figure", type=Path, default=FIGURE, help="copy of the plot that the doc shows")
    parser.add_argument("--no-doc", action="store_true", help="write only OUT/robustness.json and .png")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.min_requests < 1:
        parser.error("--min-requests must be at least 1")
    try:
        results = measure(
            args.model_dir, args.data, args.limit, args.seed, Thresholds(min_requests=args.min_requests)
        )
    except (DataError, RulesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        print(
            f"error: {err}; export a model first (`python -m training.export`, or pass --model-dir)",
            file=sys.stderr,
        )
        return 2
    command = shlex.join(["python", "-m", "monitoring.robustness", *(sys.argv[1:] if argv is None else argv)])
    results["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    report, figure = args.out / "robustness.json", args.out / "robustness.png"
    report.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, figure)
    print(f"wrote {report} and {figure}")
    if not args.no_doc:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, args.figure)
        write_block(args.doc, "robustness", render(results, command, args.figure, args.doc))
        print(f"updated {args.doc} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
