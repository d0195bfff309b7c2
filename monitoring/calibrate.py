"""Measure what the drift rules would see, to choose and check their thresholds.

    python -m monitoring.calibrate                         # artifacts/model, data/ -> docs/monitoring.md
    python -m monitoring.calibrate --model-dir M --data D --windows 40

Splits the test set into windows of the alerts' minimum size (monitoring.rules.Thresholds) and
computes, exactly as the rules do (same bins, same epsilon), per window: the worst input-feature
PSI against the export's reference, the class-mix distance from the training prior and the
low-confidence share. Clean windows show the noise floor the thresholds must clear; shifted
windows (inverted, darkened, brightened, noisy, rotated) show what each shift does to them. The
table and the exact command replace the block between the calibrate markers in docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from handler import monitor
from handler.preprocess import PreprocessSpec, normalize
from handler.variants import EXPORTED_VARIANT, load_model
from monitoring import detector
from monitoring.rules import RulesError, Thresholds
from monitoring.shifts import SHIFTS
from serving.docblock import write_block
from training.cli import add_model_and_data
from training.data import DataError, load_split

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "monitoring.md"


# Each traffic kind is a chain of (shift, level) from monitoring.shifts, the set robustness uses.
TRAFFIC: dict[str, tuple[tuple[str, float], ...]] = {
    "clean": (),
    "inverted": (("inversion", 1.0),),
    "darkened (x0.5)": (("exposure", 0.5),),
    "brightened (x0.6 + 100)": (("exposure", 0.6), ("brightness", 100)),
    "noisy (sigma 60)": (("gaussian_noise", 60),),
    "rotated 30 degrees": (("rotation", 30),),
}


def window_scores(
    images: np.ndarray, model: torch.nn.Module, spec: PreprocessSpec, mspec: monitor.MonitorSpec, ref: dict
) -> dict[str, float]:
    x = normalize(torch.from_numpy(images), spec)
    psi = detector.feature_psi(detector.feature_bins(monitor.input_stats(x, spec), mspec), ref).values()
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)
    confidence, top1 = probs.max(dim=1)
    mix = torch.bincount(top1, minlength=len(ref["classes"])).double() / len(images)
    prior = torch.tensor(list(ref["classes"].values()), dtype=torch.float64)
    low = float((confidence < Thresholds.low_confidence_below).double().mean())
    return {"psi": max(psi), "mix": 0.5 * float((mix - prior).abs().sum()), "low": low}


def measure(model_dir: Path, data: Path, windows: int, size: int) -> dict[str, list[dict[str, float]]]:
    meta, ref, spec, mspec = detector.export_specs(model_dir)
    model = load_model(model_dir / "model.pt", meta.get("variant", EXPORTED_VARIANT))
    test = load_split(data, "test")
    rng = np.random.default_rng(0)
    out = {}
    for name, steps in TRAFFIC.items():
        scores = []
        for w in range(min(windows, len(test) // size)):
            images, labels = (
                test.images.numpy()[w * size : (w + 1) * size],
                test.labels.numpy()[w * size : (w + 1) * size],
            )
            for shift, level in steps:
                images, labels = SHIFTS[shift].apply(images, labels, level, rng)
            scores.append(window_scores(images, model, spec, mspec, ref))
        out[name] = scores
    return out


def render(results: dict[str, list[dict[str, float]]], command: str, size: int) -> str:
    limits = Thresholds()

    def cell(name: str, key: str) -> str:
        values = sorted(s[key] for s in results[name])
        return f"{values[len(values) // 2]:.3f} ({values[0]:.3f}-{values[-1]:.3f})"

    rows = "\n".join(
        f"| {name} | {cell(name, 'psi')} | {cell(name, 'mix')} | {cell(name, 'low')} |" for name in results
    )
    return f"""Measured on {time.strftime("%Y-%m-%d")} with `{command}`:
{len(results["clean"])} windows of {size} test images each (the alerts' minimum), median (min-max)
per window. Thresholds: PSI {limits.psi},
class-mix distance {limits.class_mix}, low-confidence share max({limits.low_confidence_factor} x reference,
reference + {limits.low_confidence_margin}).

| traffic | worst feature PSI | class-mix distance | low-confidence share |
|---|---|---|---|
{rows}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.calibrate", description=__doc__.split("\n\n")[0]
    )
    add_model_and_data(parser)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    size = Thresholds.min_requests
    try:
        results = measure(args.model_dir, args.data, args.windows, size)
    except (DataError, RulesError, FileNotFoundError, KeyError) as err:
        print(
            f"error: {err}; export a model (`python -m training.export`) and prepare the data first",
            file=sys.stderr,
        )
        return 2
    command = shlex.join(
        ["python", "-m", "monitoring.calibrate", *(argv if argv is not None else sys.argv[1:])]
    )
    write_block(args.doc, "calibrate", render(results, command, size))
    print(render(results, command, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
