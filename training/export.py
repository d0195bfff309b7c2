"""Export the best checkpoint of a training run as TorchScript plus serving metadata.

    python -m training.export              # <repo>/outputs/train/latest -> <repo>/artifacts/model
    python -m training.export --run outputs/train/2026-11-26_10-00-00 --out artifacts/model --version 1.1

The version defaults to a short hash of what the model computes (weights + the metadata that
changes its answers, model/fingerprint.py): the same model always gets the same version, a
retrained one a new version, and nobody types one by hand.

Writes, atomically (a failed export leaves the previous one in place):
  model.pt             torch.jit.script, NOT frozen, so other torch versions load it
                       (serving and evaluation freeze after loading)
  model_meta.json      handler.meta.ModelMeta: preprocessing, classes, version, git commit,
                       config hash, DVC data hash, weights digest, test/val accuracy,
                       reference input statistics for drift checks
  index_to_name.json   class index -> label, from the same ModelMeta
  train_config.yaml    the run's resolved Hydra config

Before writing, the export checks itself: the reloaded TorchScript must match the
eager model (allclose) on a real test batch and predict identical classes on the
whole test set. If either check fails, export exits 1 and writes nothing; a missing run or data
exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from handler.meta import NAME_PATTERN, ModelMeta
from handler.monitor import reference_histograms
from handler.preprocess import PreprocessSpec, normalize
from handler.variants import torchscript_quietly
from model import count_parameters, model_version, weights_digest
from training.checkpoint import CheckpointError, load_checkpoint
from training.cli import EXIT_USAGE, EXPORT_DIR, REPO_ROOT, RUN_ROOT, StageError, repo_path, run_stage
from training.data import CLASSES, dvc_data_hash, load_split
from training.evaluate import predict_logits

PROG = "python -m training.export"


class ExportError(StageError):
    """The export failed a check (exit 1) or lacks an input (exit 2); the message says what to do."""


def git_commit() -> str:
    """HEAD's commit, with '-dirty' if the tree has changes; 'unknown' outside git."""
    repo = REPO_ROOT
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def config_hash(cfg: dict) -> str:
    canonical = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def reference_stats(
    images: torch.Tensor,
    labels: torch.Tensor,
    confidences: torch.Tensor,
    spec: PreprocessSpec,
    bins: int = 32,
) -> dict:
    """Training-input statistics the server can compare live traffic against (drift).

    `histograms` holds the bins the server's model metrics use (handler/monitor.py) with the
    training set's counts per bin, and the top-1 confidence on held-out data; `class_counts` is
    the training label mix. monitoring/rules.py turns both into the Prometheus drift rules.
    """
    x = images.to(torch.float64) / 255.0
    brightness = x.mean(dim=(1, 2))
    counts = torch.histc(brightness, bins=bins, min=0.0, max=1.0)
    return {
        "num_images": len(images),
        "pixel_mean": x.mean(0).round(decimals=5).tolist(),
        "pixel_std": x.std(0).round(decimals=5).tolist(),
        "brightness_hist": {
            "edges": torch.linspace(0, 1, bins + 1).round(decimals=5).tolist(),
            "counts": [int(c) for c in counts],
        },
        "brightness_mean": float(brightness.mean()),
        "brightness_std": float(brightness.std()),
        "histograms": reference_histograms(normalize(images, spec), confidences, spec),
        "class_counts": [int(c) for c in torch.bincount(labels, minlength=len(CLASSES))],
    }


def check_parity(
    eager: torch.nn.Module, scripted: torch.nn.Module, inputs: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    """Raise ExportError unless scripted == eager; return the scripted logits for `inputs`."""
    with torch.inference_mode():
        a, b = eager(inputs[:batch]), scripted(inputs[:batch])
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise ExportError(
            f"TorchScript output differs from the eager model (max abs diff {(a - b).abs().max():.3g}) "
            "on a real test batch; the model uses something torch.jit.script changes. Export aborted."
        )
    eager_pred = predict_logits(eager, inputs).argmax(1)
    logits = predict_logits(scripted, inputs)
    mismatched = int((logits.argmax(1) != eager_pred).sum())
    if mismatched:
        raise ExportError(
            f"TorchScript predicts a different class than the eager model on {mismatched} of "
            f"{len(inputs)} test images. Export aborted."
        )
    return logits


def resolve_run(run: Path) -> tuple[Path, Path]:
    """(checkpoint, resolved config) of a training run directory."""
    ckpt, cfg = run / "checkpoints" / "best.ckpt", run / "config.yaml"
    for path in (ckpt, cfg):
        if not path.is_file():
            raise ExportError(
                f"{path} not found; train first with `python -m training.train` (or pass --run)",
                exit_code=EXIT_USAGE,
            )
    return ckpt, cfg


def _replace_dir(src: Path, dst: Path) -> None:
    """Swap a fully written directory into place, so `dst` is never half-written."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def export(run: Path, out: Path, version: str | None = None, data_root: Path | None = None) -> ModelMeta:
    """Export run's best checkpoint into `out`; return the metadata written.

    `version=None` derives it from the weights and metadata (model/fingerprint.py).
    """
    if version is not None and not NAME_PATTERN.match(version):
        raise ExportError(f"--version {version!r} must match {NAME_PATTERN.pattern}", exit_code=EXIT_USAGE)
    ckpt, cfg_path = resolve_run(run)
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    data_root = data_root or repo_path(cfg["data"]["root"])
    try:
        net, spec = load_checkpoint(ckpt)
    except CheckpointError as exc:
        raise ExportError(str(exc), exit_code=EXIT_USAGE) from exc
    # Plain NCHW weights: the layout every loader and torch version expects.
    eager = net.to(memory_format=torch.contiguous_format)  # in eval mode already

    test, val, train = (load_split(data_root, split) for split in ("test", "val", "train"))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torchscript_quietly():
            torch.jit.script(eager).save(str(staging / "model.pt"))
            scripted = torch.jit.load(str(staging / "model.pt"), map_location="cpu").eval()
        test_logits = check_parity(eager, scripted, normalize(test.images, spec))
        val_logits = predict_logits(scripted, normalize(val.images, spec))
        accuracy = {
            "test_accuracy": int((test_logits.argmax(1) == test.labels).sum()) / len(test),
            "val_accuracy": int((val_logits.argmax(1) == val.labels).sum()) / len(val),
        }
        architecture = {
            "class": type(eager).__name__,
            **cfg["model"],  # every training.config.ModelConfig field: what the net was built from
            "num_params": count_parameters(eager),
        }
        weights = weights_digest(scripted)
        identity = {"architecture": architecture, "preprocess": spec.to_meta(), "classes": CLASSES}
        meta = ModelMeta(
            version=version or model_version(weights, identity),
            classes=CLASSES,
            preprocess=spec,
            architecture=architecture,
            metrics=accuracy,
            reference_stats=reference_stats(
                train.images, train.labels, torch.softmax(val_logits, 1).amax(1), spec
            ),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            git_commit=git_commit(),
            config_hash=config_hash(cfg),
            torch_version=torch.__version__.split("+")[0],
            source={"run_dir": str(run.resolve()), "checkpoint": str(ckpt.resolve())},
            # Provenance and identity: which exact split (DVC's hash, None outside the pipeline)
            # and which weights.
            data_hash=dvc_data_hash(data_root, REPO_ROOT),
            weights_digest=weights,
        )
        meta.save(staging)
        shutil.copy2(cfg_path, staging / "train_config.yaml")
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=RUN_ROOT / "latest", help="training run dir")
    parser.add_argument("--out", type=Path, default=EXPORT_DIR, help="export dir")
    parser.add_argument(
        "--version", help="model version served by TorchServe (default: derived from weights + metadata)"
    )
    parser.add_argument("--data", type=Path, help="processed data root (default: the run's data.root)")
    args = parser.parse_args(None if argv is None else list(argv))

    def run() -> None:
        meta = export(args.run, args.out, args.version, args.data)
        m = meta.metrics
        print(
            f"exported {meta.name} v{meta.version} "
            f"({meta.architecture['num_params']:,} params) -> {args.out}\n"
            f"parity: TorchScript == eager on the test set; test accuracy {m['test_accuracy']:.4f}, "
            f"val accuracy {m['val_accuracy']:.4f}"
        )

    return run_stage(PROG, run)


if __name__ == "__main__":
    raise SystemExit(main())
