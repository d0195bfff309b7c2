"""How a served model file is loaded: one entry per variant of the exported model.

`python -m archive.build --variant NAME` writes the variant's model file into the archive and its
name into the archive's model_meta.json (`variant`); the handler, offline evaluation and the
variant benchmark all load it with `load_model`, so each runs exactly what the server runs:

    >>> model = load_model(Path("model.pt"), "int8")      # (pin engine ->) jit.load -> freeze (-> optimize)
    >>> model(batch)                                      # (N, C) logits

Every file stays plain TorchScript saved *unfrozen* (other torch versions load it: the serving
image has an older torch than training); freezing and optimising happen here, after loading.
This module ships inside the `.mar` (as `handler/variants.py`), so it depends only on torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Variant:
    """A model file's format and the settings it is loaded with."""

    name: str
    description: str
    optimize: bool = True  # torch.jit.optimize_for_inference after freezing (conv-BN folding, oneDNN)
    channels_last: bool = False  # inputs reach the model in NHWC layout
    # torch.jit.enable_onednn_fusion: oneDNN Graph fuses conv/BN/ReLU chains over the profiled graph.
    # A process-wide switch, which is fine in a TorchServe worker: one model per process.
    onednn_graph: bool = False
    quantized: bool = False  # the file holds int8 weights: it answers differently from the export


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("fp32", "the export's TorchScript, frozen and optimize_for_inference at load"),
        Variant("fp32-channels-last", "fp32, inputs in channels_last (NHWC) layout", channels_last=True),
        Variant("fp32-frozen", "fp32, frozen only (no optimize_for_inference)", optimize=False),
        Variant("fp32-onednn-graph", "fp32, frozen, oneDNN Graph fusion", optimize=False, onednn_graph=True),
        Variant(
            "int8",
            "x86 int8 post-training quantization (FX graph mode, output layer fp32), traced TorchScript, "
            "frozen at load",
            optimize=False,
            quantized=True,
        ),
    )
}
# What training.export writes: the export itself is the fp32 variant.
EXPORTED_VARIANT = "fp32"
# The quantized engine int8 files are built and loaded with: x86 (fbgemm's kernels, and oneDNN's for
# convolutions where the CPU has AVX-512 VNNI, which there beat fbgemm alone at batch 8).
QUANTIZED_ENGINE = "x86"


@contextmanager
def nondeterministic_kernels() -> Iterator[None]:
    """Run int8 kernels even where torch.use_deterministic_algorithms(True) is on, and restore it.

    Lightning's `trainer.deterministic` switches that on for the whole process and leaves it on, so
    any process that trained first (a notebook, the tests) would have the quantized kernels, which
    have no deterministic version, raise. A worker never trains, so there it changes nothing.
    """
    if not torch.are_deterministic_algorithms_enabled():
        # The worker's case. torch.use_deterministic_algorithms imports torch._inductor on its first
        # call, which added 1.5 s or more to every worker's first int8 answer here.
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


class ServedModel(torch.nn.Module):
    """A loaded model plus the input layout its variant expects."""

    def __init__(self, module: torch.jit.ScriptModule, variant: Variant) -> None:
        super().__init__()
        self.module, self.variant = module, variant

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.variant.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.variant.quantized:
            with nondeterministic_kernels():
                return self.module(inputs)
        return self.module(inputs)


@contextmanager
def torchscript_quietly() -> Iterator[None]:
    """Silence torch's FutureWarning on every torch.jit call inside the block, and only that warning.

    TorchScript is this project's serving format; torch flags each torch.jit call as deprecated,
    which would add stderr lines to every worker start and export with nothing to act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def variant_named(name: str) -> Variant:
    """The Variant called `name`; ValueError listing the known names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; known: {', '.join(VARIANTS)}") from None


def use_quantized_engine() -> None:
    """Pin the process's quantized engine to QUANTIZED_ENGINE (process-wide, like the oneDNN switch).

    A quantized file's weights are re-packed when it is loaded, by whichever engine the process has
    then: the same int8 file loaded under fbgemm answers up to 0.4 logits away from it loaded under
    x86. Pinning it here makes the worker, offline evaluation and the build's parity check run the
    kernels the file was quantized and checked with, whatever the process's default.
    """
    try:
        torch.backends.quantized.engine = QUANTIZED_ENGINE
    except RuntimeError as exc:
        raise RuntimeError(
            f"this torch cannot run int8 models with the {QUANTIZED_ENGINE!r} quantized engine "
            f"(it has {', '.join(torch.backends.quantized.supported_engines)}): serve the unquantized "
            f"export, built with `python -m archive.build --variant {EXPORTED_VARIANT}` ({exc})"
        ) from exc


def load_model(path: Path, variant: str = EXPORTED_VARIANT) -> ServedModel:
    """An unfrozen TorchScript file -> the frozen, optimised model its variant serves."""
    settings = variant_named(variant)
    torch.jit.enable_onednn_fusion(settings.onednn_graph)
    if settings.quantized:
        use_quantized_engine()
    with torchscript_quietly():
        module = torch.jit.freeze(torch.jit.load(str(path), map_location="cpu").eval())
        if settings.optimize:
            module = torch.jit.optimize_for_inference(module)
    return ServedModel(module, settings).eval()
