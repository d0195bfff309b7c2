"""Build model_store/<name>.mar from an export directory, and prove it answers before publishing it.

    python -m archive.build            # <repo>/artifacts/model -> <repo>/model_store/fashion_mnist.mar
                                       # (int8, calibrated and checked on <repo>/data: --data)
    python -m archive.build --export-dir X --store Y --batch-size 8 --max-batch-delay 5 --max-workers 2
    python -m archive.build --variant fp32                 # another variant (handler/variants.py)

1. Validate the export written by `python -m training.export`: model.pt, model_meta.json and
   index_to_name.json exist inside the export directory (symlinks resolved), the metadata loads as a
   valid handler.meta.ModelMeta (both files list the same classes), and the model's output has one
   score per class. The archive's model name and version are the metadata's unless --name is given.
2. Build the served variant (archive/variants.py; the default is archive.variants.DEFAULT_VARIANT).
   Any variant but the export itself is checked against the export on the whole test set of --data
   and refused if it loses more than 0.2 points of accuracy; the archive's model_meta.json records
   the variant, so the handler loads the file right, and its metrics. A quantized variant answers
   differently from the export, so its archive version is the export's plus "-<variant>".
3. Stage the handler package (handler/*.py only) with the metadata, write model-config.yaml from
   the flags, and run torch-model-archiver in a fresh process with a private TMPDIR (it stages in
   $TMPDIR/<name>, which concurrent builds would otherwise share).
4. Unpack the archive and answer a PNG and a bad body with TorchServe's own worker code in a fresh
   interpreter that can import only the archive (archive/selfcheck.py).
5. Only then move the archive into the store with an atomic rename, so a failed build never leaves
   a partial or unchecked <name>.mar behind.

Exit codes: 2 when the export or the flags need fixing, 1 when the archiver or the self-check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from archive.variants import DEFAULT_VARIANT, MAX_ACCURACY_DROP, VariantError, build_variant
from handler.meta import NAME_PATTERN, MetaError, ModelMeta
from handler.preprocess import PreprocessSpec
from handler.variants import EXPORTED_VARIANT, VARIANTS, torchscript_quietly
from model.fingerprint import model_version, weights_digest
from training.cli import DATA_DIR, EXIT_USAGE, EXPORT_DIR, MODEL_STORE, REPO_ROOT, StageError, run_stage

PROG = "python -m archive.build"
HANDLER_PACKAGE = REPO_ROOT / "handler"
HANDLER_MODULE = "fashion_handler.py"
SELFCHECK = Path(__file__).resolve().parent / "selfcheck.py"
EXPORT_HINT = "run `python -m training.export` (or point --export-dir at an export)"


class ArchiveError(StageError):
    """The archive cannot be built as asked; the message says what to fix.

    Exit 2 (`exit_code=EXIT_USAGE`) where the export or the flags are at fault, 1 where a build step failed.
    """


@dataclass(frozen=True)
class Export:
    """A validated export directory, or the files of the variant built from it (`served_variant`)."""

    model: Path
    meta_file: Path
    index_file: Path
    meta: ModelMeta
    fingerprint: str  # model/fingerprint.py: weights + identity metadata, not the file's bytes
    weights: str  # weights_digest of the export's fp32 model, which every variant is built from

    @property
    def version(self) -> str:
        return self.meta.version


@dataclass(frozen=True)
class ServingConfig:
    """model-config.yaml: per-model TorchServe settings shipped inside the archive.

    The defaults are the measured winners on a 2-core host (`python -m scripts.sweep_serving`,
    docs/serving.md "Settings sweep"): two workers, each with one torch thread, and up to 8 requests
    that arrive within 2 ms share one forward pass. At 16 clients that served 1.6x the requests of one
    worker with a 5 ms delay, and cut a lone request's p99 from 12.5 to 9.7 ms. TorchServe 0.12
    starts `min_workers` and never adds workers by itself; `max_workers` is only the ceiling a
    management-API scale call may set.
    """

    min_workers: int = 2
    max_workers: int = 2
    batch_size: int = 8
    max_batch_delay: int = 2  # ms a batch waits to fill up
    response_timeout: int = 30  # s for one batch before TorchServe restarts the worker
    startup_timeout: int = 120  # s for a worker to load the model

    def to_yaml(self) -> str:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ArchiveError("need 1 <= --min-workers <= --max-workers", exit_code=EXIT_USAGE)
        if self.batch_size < 1 or self.max_batch_delay < 0:
            raise ArchiveError("need --batch-size >= 1 and --max-batch-delay >= 0", exit_code=EXIT_USAGE)
        if self.response_timeout < 1 or self.startup_timeout < 1:
            raise ArchiveError(
                "need --response-timeout >= 1 and --startup-timeout >= 1", exit_code=EXIT_USAGE
            )
        config = {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay,
            "responseTimeout": self.response_timeout,
            "startupTimeout": self.startup_timeout,
            # The handler runs the model on CPU; this keeps TorchServe from assigning GPU ids.
            "deviceType": "cpu",
        }
        header = "# Written by `python -m archive.build`; change it with that command's flags.\n"
        return header + yaml.safe_dump(config, sort_keys=False)


@dataclass(frozen=True)
class BuildResult:
    path: Path
    size: int
    version: str
    sha256: str
    check_summary: dict[str, Any]
    replaced: str | None  # what happened to an archive that was already there
    meta: ModelMeta  # the archive's model_meta.json: variant, version, metrics of what it serves


def require_inside(path: Path, root: Path, what: str, missing_hint: str = EXPORT_HINT) -> Path:
    """Resolve symlinks and refuse files that end up outside `root` (or do not exist)."""
    resolved, base = path.resolve(), root.resolve()
    if not resolved.is_relative_to(base):
        raise ArchiveError(
            f"{what} {path} resolves to {resolved}, outside {base}; copy the real file there",
            exit_code=EXIT_USAGE,
        )
    if not resolved.is_file():
        raise ArchiveError(f"{what} {path} not found; {missing_hint}", exit_code=EXIT_USAGE)
    return resolved


def validate_export(export_dir: Path) -> Export:
    """Check an export directory is complete and self-consistent; raise ArchiveError saying what is wrong."""
    if not export_dir.is_dir():
        raise ArchiveError(f"export directory {export_dir} not found; {EXPORT_HINT}", exit_code=EXIT_USAGE)
    model = require_inside(export_dir / "model.pt", export_dir, "model file")
    meta_file = require_inside(export_dir / "model_meta.json", export_dir, "metadata file")
    index_file = require_inside(export_dir / "index_to_name.json", export_dir, "class index file")
    try:
        meta = ModelMeta.load(export_dir)
    except MetaError as exc:
        raise ArchiveError(str(exc), exit_code=EXIT_USAGE) from exc
    scripted = _check_model_output(model, meta.preprocess, len(meta.classes))
    weights = weights_digest(scripted)
    return Export(model, meta_file, index_file, meta, model_version(weights, meta.to_json()), weights)


def served_variant(
    export: Export, variant: str, data_root: Path | None, work: Path, max_drop: float = MAX_ACCURACY_DROP
) -> Export:
    """The files that go into the archive for `variant`: the export itself, or the variant built
    from it with metadata that names the variant, its checked metrics and its version."""
    if variant == EXPORTED_VARIANT:
        return export
    try:
        built = build_variant(export.model.parent, variant, data_root, work, max_drop)
    except VariantError as exc:
        raise ArchiveError(str(exc), exit_code=exc.exit_code) from exc
    version = f"{export.version}-{variant}" if VARIANTS[variant].quantized else export.version
    meta = dataclasses.replace(
        export.meta,
        variant=variant,
        version=version,
        metrics={**export.meta.metrics, **built.metrics},
        # The fp32 weights the variant was built from: a quantized file's state dict does not hold
        # its packed weights, so this digest is what identifies the archive (_replacement_note).
        weights_digest=export.weights,
    )
    meta.save(work)
    return Export(
        built.model_file,
        work / "model_meta.json",
        work / "index_to_name.json",
        meta,
        model_version(export.weights, meta.to_json()),
        export.weights,
    )


def build(
    export_dir: Path,
    store: Path,
    name: str | None = None,
    config: ServingConfig | None = None,
    force: bool = False,
    variant: str = DEFAULT_VARIANT,
    data_root: Path | None = DATA_DIR,
    max_drop: float = MAX_ACCURACY_DROP,
) -> BuildResult:
    """Validate, build the variant, archive, self-check, then atomically publish store/<name>.mar.

    `name` defaults to the export's; `data_root` (training.data's output) is needed by every
    variant but the export itself, for calibration and the test-set check, which refuses a variant
    that loses more than `max_drop` points of accuracy.
    """
    if name is not None and not NAME_PATTERN.match(name):
        raise ArchiveError(
            f"model name {name!r} must match {NAME_PATTERN.pattern} (TorchServe's rule)", exit_code=EXIT_USAGE
        )
    config_yaml = (config or ServingConfig()).to_yaml()
    if variant not in VARIANTS:
        raise ArchiveError(f"--variant {variant!r} is not one of {list(VARIANTS)}", exit_code=EXIT_USAGE)
    if max_drop < 0:
        raise ArchiveError("need --max-accuracy-drop >= 0 (points of test accuracy)", exit_code=EXIT_USAGE)
    export = validate_export(export_dir)
    name = name or export.meta.name
    target = store / f"{name}.mar"
    with tempfile.TemporaryDirectory(prefix=f"archive-{name}-") as tmp:
        work = Path(tmp)
        served = served_variant(export, variant, data_root, work / "variant", max_drop)
        replaced = _replacement_note(target, served, force)
        store.mkdir(parents=True, exist_ok=True)
        mar = _run_archiver(served, name, config_yaml, work)
        summary = self_check(mar, work / "unpacked")
        size, digest = mar.stat().st_size, _sha256(mar)
        _publish(mar, target)
    return BuildResult(target, size, served.version, digest, summary, replaced, served.meta)


def _check_model_output(model_file: Path, spec: PreprocessSpec, num_classes: int) -> torch.jit.ScriptModule:
    try:
        with torchscript_quietly():
            model = torch.jit.load(str(model_file), map_location="cpu").eval()
    except RuntimeError as exc:
        raise ArchiveError(
            f"{model_file} is not a TorchScript model ({exc}); {EXPORT_HINT}", exit_code=EXIT_USAGE
        ) from exc
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, *spec.input_shape))
    except RuntimeError as exc:
        raise ArchiveError(
            f"{model_file} fails on input of shape {[1, *spec.input_shape]}: {exc}", exit_code=EXIT_USAGE
        ) from exc
    if tuple(out.shape) != (1, num_classes):
        raise ArchiveError(
            f"{model_file} outputs shape {tuple(out.shape)} but the metadata lists {num_classes} classes; "
            "re-export the model with `python -m training.export`",
            exit_code=EXIT_USAGE,
        )
    return model


def _replacement_note(target: Path, export: Export, force: bool) -> str | None:
    """Decide about an archive already at `target`: None if there is none, a note if it will be replaced.

    Without --force, an existing archive is replaced unless it holds the same version of a different
    model: then the version would name two models, which breaks every rollback and cache keyed
    on it. Rebuilding the same model (say, after a handler change) or a new version just replaces it.
    "Same model" means same weights and identity metadata (model/fingerprint.py): re-scripting the
    same weights writes different bytes, and that must not count as a different model.
    """
    if not target.exists():
        return None
    if force:
        return "overwritten (--force)"
    try:
        with zipfile.ZipFile(target) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
            old_version = str(manifest.get("modelVersion"))
            old_bytes = io.BytesIO(archive.read(manifest["serializedFile"]))
            with torchscript_quietly():
                old_model = torch.jit.load(old_bytes, map_location="cpu")
            names = set(archive.namelist())
            old_meta = json.loads(archive.read("model_meta.json")) if "model_meta.json" in names else {}
        old_variant = VARIANTS.get(old_meta.get("variant") or EXPORTED_VARIANT)
        # A quantized file's state dict lacks its packed weights; archive.build recorded the digest
        # of the fp32 weights it was built from (served_variant).
        old_weights = (
            old_meta["weights_digest"] if old_variant and old_variant.quantized else weights_digest(old_model)
        )
        old_fingerprint = model_version(old_weights, old_meta)
    except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile) as exc:
        raise ArchiveError(
            f"{target} exists but is not a readable model archive ({exc}); pass --force to overwrite it",
            exit_code=EXIT_USAGE,
        ) from exc
    same_model = old_fingerprint == export.fingerprint
    if old_version == export.version and not same_model:
        raise ArchiveError(
            f"{target} already holds version {old_version} of a different model (other weights or "
            "metadata); export without --version so the version is derived from the model, or pass "
            "--force to overwrite",
            exit_code=EXIT_USAGE,
        )
    return f"replaced version {old_version}" + (" (same model)" if same_model else "")


def _run_archiver(export: Export, name: str, config_yaml: str, work: Path) -> Path:
    extra = work / "extra"
    package = extra / "handler"
    package.mkdir(parents=True)
    # The handler package goes in as source only: no __pycache__, tests or editor files.
    for source in sorted(HANDLER_PACKAGE.glob("*.py")):
        real = require_inside(source, REPO_ROOT, "handler file", "restore it from git")
        shutil.copyfile(real, package / source.name)
    if not (package / HANDLER_MODULE).is_file():
        raise ArchiveError(
            f"{HANDLER_PACKAGE / HANDLER_MODULE} not found; the handler entry point is missing"
        )
    for source in (export.meta_file, export.index_file):
        shutil.copyfile(source, extra / source.name)
    config_file = work / "model-config.yaml"
    config_file.write_text(config_yaml, encoding="utf-8")
    out, private_tmp = work / "out", work / "tmp"
    out.mkdir()
    private_tmp.mkdir()
    command = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", name,
        "--version", export.version,
        "--serialized-file", str(export.model),
        "--handler", str(package / HANDLER_MODULE),
        # A directory's contents land in the archive root, subdirectories kept: handler/, *.json.
        "--extra-files", str(extra),
        "--config-file", str(config_file),
        "--export-path", str(out),
        "--archive-format", "default",
    ]  # fmt: skip
    proc = subprocess.run(
        command, env={**os.environ, "TMPDIR": str(private_tmp)}, capture_output=True, text=True, check=False
    )
    mar = out / f"{name}.mar"
    if proc.returncode != 0 or not mar.is_file():
        raise ArchiveError(f"torch-model-archiver failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")
    return mar


def self_check(mar: Path, unpacked: Path) -> dict[str, Any]:
    """Unpack `mar` into `unpacked` and run archive/selfcheck.py on it; its summary, or ArchiveError."""
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(unpacked)
    # -P and a PYTHONPATH of only the unpacked archive: the handler must work from what it ships.
    proc = subprocess.run(
        [sys.executable, "-P", str(SELFCHECK), str(unpacked)],
        cwd=unpacked,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ArchiveError(
            "the built archive failed its self-check, so nothing was written to the store:\n"
            + _tail(proc.stderr)
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _publish(mar: Path, target: Path) -> None:
    """Copy next to the target under a name TorchServe ignores, then rename over it (atomic on POSIX)."""
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as dst, mar.open("rb") as src:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServingConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=(
            "An existing STORE/NAME.mar is replaced, unless it holds the same version of a different "
            "model.pt (a version must name one model): then the build stops unless --force is given."
        ),
    )
    add = parser.add_argument
    add("--export-dir", type=Path, default=EXPORT_DIR, help="output of training.export")
    add("--store", type=Path, default=MODEL_STORE, help="TorchServe model store")
    add("--name", help="model name in TorchServe and in the file name (default: the export's)")
    add("--min-workers", type=int, default=defaults.min_workers, help="workers kept running")
    add("--max-workers", type=int, default=defaults.max_workers, help="ceiling for scale calls")
    add("--batch-size", type=int, default=defaults.batch_size, help="requests per forward pass, at most")
    add("--max-batch-delay", type=int, default=defaults.max_batch_delay, help="ms a batch waits to fill")
    add(
        "--response-timeout", type=int, default=defaults.response_timeout, help="s per batch before a restart"
    )
    add("--startup-timeout", type=int, default=defaults.startup_timeout, help="s for a worker to load")
    add(
        "--variant",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANT,
        help="how the model is stored and loaded (handler/variants.py; figures in docs/serving.md)",
    )
    add("--data", type=Path, default=DATA_DIR, help="training.data's output: calibration and parity check")
    add(
        "--max-accuracy-drop",
        type=float,
        default=MAX_ACCURACY_DROP,
        help="points of test accuracy a variant may lose against the export before the build stops",
    )
    add("--force", action="store_true", help="overwrite an existing archive whatever it holds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = ServingConfig(
        args.min_workers,
        args.max_workers,
        args.batch_size,
        args.max_batch_delay,
        args.response_timeout,
        args.startup_timeout,
    )

    def run() -> None:
        result = build(
            args.export_dir,
            args.store,
            args.name,
            config,
            args.force,
            args.variant,
            args.data,
            args.max_accuracy_drop,
        )
        metrics = result.meta.metrics
        if result.meta.variant != EXPORTED_VARIANT:
            print(
                f"variant {result.meta.variant}: test accuracy {metrics['test_accuracy']:.4f} "
                f"(export {metrics['fp32_test_accuracy']:.4f}), top-1 agreement with the export "
                f"{metrics['agreement']:.4f} on {metrics['test_images']} test images"
            )
        top = result.check_summary["top"]
        print(
            f"self-check passed: PNG -> 200 (top: {top['label']} {top['probability']:.3f}), bad body -> 400"
        )
        if result.replaced:
            print(f"existing archive {result.replaced}")
        size = f"{result.size} bytes ({result.size / 1024:.1f} KiB)"
        rows = (("archive", result.path), ("size", size), ("version", result.version))
        for label, value in (*rows, ("variant", result.meta.variant)):
            print(f"{label + ':':<9}{value}")
        print(f"sha256:  {result.sha256}")

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
