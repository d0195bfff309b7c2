"""Build a served variant of an exported model and prove it answers like the export.

`python -m archive.build --variant NAME` calls `build_variant`; `python -m scripts.bench_variants`
measures every variant. The variants and how each is loaded are defined in handler/variants.py
(shipped in the archive); this module writes their files:

    >>> built = build_variant(Path("artifacts/model"), "int8", Path("data"), Path("/tmp/work"))
    >>> built.model_file, built.metrics["test_accuracy"], built.metrics["agreement"]

fp32 variants serve the export's own model.pt (they differ in how it is loaded). `int8` quantizes
it for x86 (AVX-512 VNNI where the CPU has it) with FX graph mode post-training quantization,
calibrated on training images, all but its output layer, and saves the traced result as unfrozen
TorchScript, which the serving image's older torch loads too.

Every variant but the export itself is checked on the whole test set against the export, both
loaded as the server loads them: its accuracy may fall at most MAX_ACCURACY_DROP below the
export's, or the build stops (VariantError, exit 1) and nothing is archived.
"""

from __future__ import annotations

import inspect
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from handler.meta import ModelMeta
from handler.preprocess import normalize
from handler.variants import (
    EXPORTED_VARIANT,
    QUANTIZED_ENGINE,
    load_model,
    nondeterministic_kernels,
    torchscript_quietly,
    use_quantized_engine,
    variant_named,
)
from model import FashionCNN
from training.cli import EXIT_USAGE, StageError
from training.data import load_split
from training.evaluate import predict_logits

# THE DEFAULT VARIANT of `python -m archive.build` (and so of `make archive` and the DVC stage,
# which pass no --variant). Chosen by `python -m scripts.bench_variants` (docs/serving.md).
DEFAULT_VARIANT = "int8"
# Largest accuracy loss, in points of test accuracy, a variant may have against the export.
MAX_ACCURACY_DROP = 0.2
CALIBRATION_IMAGES = 2048  # training images the int8 observers see
CALIBRATION_SEED = 0
DATA_HINT = "run `python -m training.data` (or point --data at its output)"


class VariantError(StageError):
    """A variant cannot be built, or fails its parity check; the message says what to do."""


@dataclass(frozen=True)
class BuiltVariant:
    """A variant's model file and the metrics of the file as the server loads it."""

    name: str
    model_file: Path
    # test_accuracy of the variant; for a variant other than the export also the export's
    # accuracy (fp32_test_accuracy), top-1 agreement with it, and the number of test images.
    metrics: dict[str, float]


def eager_model(model_file: Path, meta: ModelMeta) -> torch.nn.Module:
    """The export's weights in an eager FashionCNN: quantization rewrites eager modules, not TorchScript."""
    arch = meta.architecture
    if arch.get("class") != FashionCNN.__name__:
        raise VariantError(
            f"the export's architecture is {arch.get('class')!r}; quantized variants know how to rebuild "
            f"only {FashionCNN.__name__}: build the fp32 variant (--variant {EXPORTED_VARIANT})",
            exit_code=EXIT_USAGE,
        )
    # The export records every ModelConfig field it was built from; num_params is a count, not a setting.
    settings = inspect.signature(FashionCNN).parameters.keys() - {"in_channels", "num_classes", "image_size"}
    hyper = {k: v for k, v in arch.items() if k in settings}
    eager = FashionCNN(num_classes=len(meta.classes), image_size=meta.preprocess.height, **hyper)
    with torchscript_quietly():
        scripted = torch.jit.load(str(model_file), map_location="cpu")
    try:
        eager.load_state_dict(scripted.state_dict())
    except RuntimeError as exc:
        raise VariantError(
            f"the export's weights do not fit FashionCNN({hyper}): its metadata predates a field the "
            f"architecture needs; re-export it with `python -m training.export` ({exc})",
            exit_code=EXIT_USAGE,
        ) from exc
    return eager.eval()


def quantize_int8(eager: torch.nn.Module, calibration: torch.Tensor) -> torch.jit.ScriptModule:
    """FX post-training static quantization for x86, calibrated on `calibration`; traced TorchScript.

    The output layer (the last Linear) stays fp32: quantized, its logits would be 8-bit, about 130
    distinct values over the 100,000 logits of the test set, and about 1.5% of test images would tie
    for the top class, which the server's top-k and offline argmax break differently. Kept in fp32,
    no image ties and accuracy is higher, at no measurable cost in latency (one 128x10 matmul).

    Traced, not scripted: torch.jit.script cannot compile FX's generated forward. The graph has no
    data-dependent control flow, so the trace is exact for every batch size.
    """
    use_quantized_engine()
    output_layer = [name for name, module in eager.named_modules() if isinstance(module, torch.nn.Linear)][-1]
    qconfig = get_default_qconfig_mapping(QUANTIZED_ENGINE).set_module_name(output_layer, None)
    example = (calibration[:1],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's own deprecation notices
        prepared = prepare_fx(eager, qconfig, example)
        with torch.inference_mode():
            for first in range(0, len(calibration), 256):
                prepared(calibration[first : first + 256])
        quantized = convert_fx(prepared)
        return torch.jit.trace(quantized, example)


def calibration_set(data_root: Path, meta: ModelMeta, count: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """`count` training images, drawn with a fixed seed, normalised as the model sees them."""
    train = load_split(data_root, "train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:count]
    return normalize(train.images[pick], meta.preprocess)


def parity(
    export_file: Path,
    variant_file: Path,
    variant: str,
    data_root: Path,
    meta: ModelMeta,
    max_drop: float = MAX_ACCURACY_DROP,
) -> dict[str, float]:
    """Accuracy of the variant and of the export on the whole test set, both loaded as served.

    Raises VariantError if the variant loses more than `max_drop` points of accuracy.
    """
    test = load_split(data_root, "test")
    inputs = normalize(test.images, meta.preprocess)
    reference = predict_logits(load_model(export_file, EXPORTED_VARIANT), inputs).argmax(1)
    predicted = predict_logits(load_model(variant_file, variant), inputs).argmax(1)
    metrics = {
        "test_accuracy": _accuracy(predicted, test.labels),
        "fp32_test_accuracy": _accuracy(reference, test.labels),
        "agreement": float((predicted == reference).float().mean()),
        "test_images": len(test),
    }
    drop = 100 * (metrics["fp32_test_accuracy"] - metrics["test_accuracy"])
    if drop > max_drop:
        raise VariantError(
            f"variant {variant} scores {metrics['test_accuracy']:.4f} on the {len(test)} test images, "
            f"{drop:.2f} points below the export's {metrics['fp32_test_accuracy']:.4f} (the limit is "
            f"{max_drop} points; agreement {metrics['agreement']:.4f}); nothing was archived. "
            f"Build another variant (--variant {EXPORTED_VARIANT} always passes) or retrain."
        )
    return metrics


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).float().mean())


def build_variant(
    export_dir: Path,
    variant: str,
    data_root: Path | None,
    work: Path,
    max_drop: float = MAX_ACCURACY_DROP,
) -> BuiltVariant:
    """Write `variant`'s model file of the export into `work` and check it; raise VariantError if it
    loses more than `max_drop` points of test accuracy against the export.

    The export itself (EXPORTED_VARIANT) needs no data: training.export checked it already.
    """
    try:
        settings = variant_named(variant)
    except ValueError as exc:
        raise VariantError(str(exc), exit_code=EXIT_USAGE) from exc
    meta = ModelMeta.load(export_dir)
    export_file = export_dir / "model.pt"
    work.mkdir(parents=True, exist_ok=True)
    model_file = work / "model.pt"
    if variant == EXPORTED_VARIANT:
        shutil.copyfile(export_file, model_file)
        return BuiltVariant(variant, model_file, dict(meta.metrics))
    if data_root is None or not (data_root / "processed").is_dir():
        raise VariantError(
            f"variant {variant} is checked on the test set, but no processed data was found at "
            f"{data_root}; {DATA_HINT}",
            exit_code=EXIT_USAGE,
        )
    if settings.quantized:
        with nondeterministic_kernels():
            quantized = quantize_int8(eager_model(export_file, meta), calibration_set(data_root, meta))
        quantized.save(str(model_file))
    else:
        shutil.copyfile(export_file, model_file)
    metrics = parity(export_file, model_file, variant, data_root, meta, max_drop)
    return BuiltVariant(variant, model_file, metrics)
