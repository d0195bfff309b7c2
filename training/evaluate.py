"""Evaluate an exported model on the official test set, the way the server will see it.

    python -m training.evaluate                                  # <repo>/artifacts/model -> <repo>/reports/
    python -m training.evaluate --model-dir artifacts/model --out reports --split val

Every image goes through handler.preprocess.preprocess (the function the TorchServe
handler calls) and the TorchScript file is frozen after loading, exactly as in
serving. Writes reports/metrics.json (accuracy, per-class precision/recall, confusion
matrix) and reports/confusion_matrix.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from handler.meta import MetaError, ModelMeta
from handler.preprocess import PreprocessSpec, preprocess
from handler.variants import load_model
from training.cli import EXIT_USAGE, REPORTS_DIR, StageError, add_model_and_data, run_stage
from training.data import load_split

PROG = "python -m training.evaluate"


def load_exported(model_dir: Path) -> tuple[torch.nn.Module, ModelMeta]:
    """Load model.pt + model_meta.json and optimise it exactly as the TorchServe handler does.

    The file is unfrozen (portable across torch versions); freezing and optimising happen after
    loading, as its variant says (handler/variants.py), so offline numbers are the numbers the
    server produces. An unpacked archive works too: its metadata names the variant it serves.
    Raises StageError (exit 2) naming the file and the command that writes it.
    """
    model_path = model_dir / "model.pt"
    if not model_path.is_file():
        raise StageError(
            f"{model_path} not found; run `python -m training.export --out {model_dir}`", exit_code=EXIT_USAGE
        )
    try:
        meta = ModelMeta.load(model_dir)
    except MetaError as exc:
        raise StageError(str(exc), exit_code=EXIT_USAGE) from exc
    return load_model(model_path, meta.variant), meta


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 1024, progress: bool = False
) -> torch.Tensor:
    """Model outputs for an input tensor (N, 1, H, W), computed in batches."""
    chunks = range(0, len(inputs), batch_size)
    return torch.cat(
        [model(inputs[i : i + batch_size]) for i in tqdm(chunks, desc="predict", disable=not progress)]
    )


def preprocess_images(images: torch.Tensor, spec: PreprocessSpec, progress: bool = False) -> torch.Tensor:
    """uint8 (N, H, W) -> model input, one PIL image at a time through the serving path."""
    return torch.stack(
        [
            preprocess(Image.fromarray(img.numpy(), mode="L"), spec)
            for img in tqdm(images, desc="preprocess", disable=not progress)
        ]
    )


def classification_report(preds: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/support and the confusion matrix (rows = truth)."""
    k = len(classes)
    cm = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(0), cm.sum(1)
    per_class = {
        name: {
            "precision": float(tp[i] / predicted[i]) if predicted[i] else 0.0,
            "recall": float(tp[i] / actual[i]) if actual[i] else 0.0,
            "support": int(actual[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "num_examples": int(cm.sum()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )  # fmt: skip
    fig.colorbar(im, ax=ax, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(
    model_dir: Path, data_root: Path, out_dir: Path, split: str = "test", progress: bool = True
) -> dict:
    """Evaluate the exported model on one split; write the JSON report and the plot."""
    model, meta = load_exported(model_dir)
    data = load_split(data_root, split)
    inputs = preprocess_images(data.images, meta.preprocess, progress)
    preds = predict_logits(model, inputs, progress=progress).argmax(1).numpy()
    report = classification_report(preds, data.labels.numpy(), meta.classes)
    report.update({"split": split, "model": meta.name, "version": meta.version})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion(
        np.array(report["confusion_matrix"]),
        meta.classes,
        f"{meta.name} v{meta.version} on {split}: accuracy {report['accuracy']:.4f}",
        out_dir / "confusion_matrix.png",
    )
    return report


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_and_data(parser)
    parser.add_argument("--out", type=Path, default=REPORTS_DIR, help="report directory")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    args = parser.parse_args(None if argv is None else list(argv))

    def run() -> None:
        report = evaluate(args.model_dir, args.data, args.out, args.split)
        width = max(len(c) for c in report["per_class"])
        print(f"\n{'class':<{width}}  precision  recall")
        for name, row in report["per_class"].items():
            print(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}")
        print(f"\n{args.split} accuracy {report['accuracy']:.4f} on {report['num_examples']} images")
        print(f"report: {args.out / 'metrics.json'}\nplot:   {args.out / 'confusion_matrix.png'}")

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
