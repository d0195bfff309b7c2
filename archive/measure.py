"""Measure every model variant in-process: latency at batch 1 and 8, test accuracy, load time.

The command line is `python -m scripts.bench_variants` (it writes the table into docs/serving.md);
this module holds the logic. Each variant is built from the export exactly as
`python -m archive.build --variant NAME` builds it (archive/variants.py) and loaded as the handler
loads it (handler/variants.py). AOTInductor (`torch.export` + `aoti_compile_and_package`) is
measured too, as a candidate that is not shipped (docs/serving.md says why).

Every measurement runs in a fresh interpreter with one torch thread, as one TorchServe worker has
(handler.fashion_handler.configure_threads): load time is then a cold load, and no variant inherits
another's process-wide settings (oneDNN fusion, thread pools, caches). Rounds alternate the
variants, so a change in machine load hits all of them alike. The child entry point is

    python -m archive.measure '{"variant": "int8", "file": "model.pt", ...}'    # prints one JSON line
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from archive.variants import DEFAULT_VARIANT, build_variant, eager_model
from handler.meta import MetaError, ModelMeta
from handler.preprocess import normalize
from handler.variants import EXPORTED_VARIANT, VARIANTS, load_model
from training.cli import EXIT_USAGE, REPO_ROOT, StageError
from training.data import load_split

AOTI = "aoti"  # measured, not shipped: not a handler.variants.VARIANTS entry
BATCHES = (1, 8)
WARMUP_CALLS = 50
AOTI_MAX_BATCH = 1024  # the compiled model's dynamic batch dimension, up to the accuracy batches


@dataclass
class Result:
    """One candidate's figures, pooled over the rounds."""

    name: str
    load_ms: list[float] = field(default_factory=list)
    latency_ms: dict[int, list[float]] = field(default_factory=dict)  # batch size -> every call
    predictions: list[int] = field(default_factory=list)  # class per test image (first round)
    accuracy: float = 0.0

    def add(self, child: dict[str, Any]) -> None:
        self.load_ms.append(child["load_ms"])
        for batch, samples in child["latency_ms"].items():
            self.latency_ms.setdefault(int(batch), []).extend(samples)
        if child.get("predictions"):
            self.predictions, self.accuracy = child["predictions"], child["accuracy"]

    def quantile(self, batch: int, q: float) -> float:
        samples = sorted(self.latency_ms[batch])
        return samples[min(len(samples) - 1, int(q * len(samples)))]


def compile_aoti(export_dir: Path, out: Path) -> Path:
    """AOTInductor package of the export with a dynamic batch dimension (minutes on 2 cores)."""
    meta = ModelMeta.load(export_dir)
    eager = eager_model(export_dir / "model.pt", meta)
    batch = torch.export.Dim("batch", min=1, max=AOTI_MAX_BATCH)
    example = torch.zeros(2, *meta.preprocess.input_shape)
    program = torch.export.export(eager, (example,), dynamic_shapes={"x": {0: batch}})
    return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(out)))


def _loader(variant: str) -> Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]:
    if variant == AOTI:
        return lambda path: torch._inductor.aoti_load_package(str(path))
    return lambda path: load_model(path, variant)


def measure_one(job: dict[str, Any]) -> dict[str, Any]:
    """In this process: load the file, time `calls` forwards per batch size, optionally score the test set."""
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    inputs = torch.load(job["inputs"], weights_only=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _loader(job["variant"])(Path(job["file"]))
        with torch.inference_mode():
            model(inputs[:1])  # the load is done when the first answer is
    result: dict[str, Any] = {"load_ms": 1e3 * (time.perf_counter() - start), "latency_ms": {}}
    with torch.inference_mode():
        for batch in BATCHES:
            x = inputs[:batch].clone()
            for _ in range(WARMUP_CALLS):
                model(x)
            samples = []
            for _ in range(job["calls"]):
                t0 = time.perf_counter()
                model(x)
                samples.append(1e3 * (time.perf_counter() - t0))
            result["latency_ms"][batch] = samples
        if job["score"]:
            labels = torch.load(job["labels"], weights_only=True)
            logits = torch.cat([model(inputs[i : i + 1000]) for i in range(0, len(inputs), 1000)])
            predictions = logits.argmax(1)
            result["predictions"] = predictions.tolist()
            result["accuracy"] = float((predictions == labels).float().mean())
    return result


def _child(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "archive.measure", json.dumps(job)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {job['variant']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(
    export_dir: Path,
    data_root: Path,
    work: Path,
    variants: Sequence[str],
    calls: int,
    rounds: int,
    progress: Callable[[str], None] = print,
) -> list[Result]:
    """Build each variant (and the AOTI package if AOTI is listed) into `work`, then measure them.

    Raises StageError (exit 2) naming the command that writes a missing export or data.
    """
    try:
        meta = ModelMeta.load(export_dir)
    except MetaError as exc:
        raise StageError(f"{exc} (looked in --export-dir {export_dir})", exit_code=EXIT_USAGE) from exc
    test = load_split(data_root, "test")
    inputs, labels = work / "test_inputs.pt", work / "test_labels.pt"
    torch.save(normalize(test.images, meta.preprocess), inputs)
    torch.save(test.labels, labels)
    files = {}
    for name in variants:
        progress(f"building {name}")
        if name == AOTI:
            files[name] = compile_aoti(export_dir, work / "model.pt2")
        else:
            files[name] = build_variant(export_dir, name, data_root, work / name).model_file
    results = {name: Result(name) for name in variants}
    for round_ in range(rounds):
        for name in variants:
            progress(f"round {round_ + 1}/{rounds}: {name}")
            job = {
                "variant": name, "file": str(files[name]), "inputs": str(inputs), "labels": str(labels),
                "calls": calls, "score": round_ == 0,
            }  # fmt: skip
            results[name].add(_child(job))
    return list(results.values())


def render(results: Sequence[Result], command: str, machine: str, calls: int, rounds: int) -> str:
    """The markdown block: how it was measured, then one row per candidate."""
    by_name = {r.name: r for r in results}
    reference = by_name.get(EXPORTED_VARIANT)
    rows = []
    for r in results:
        shipped = "**default**" if r.name == DEFAULT_VARIANT else "selectable" if r.name in VARIANTS else "no"
        drop = agree = "–"
        if reference is not None and r.predictions:
            drop = f"{100 * (reference.accuracy - r.accuracy):.2f}"
            same = sum(a == b for a, b in zip(r.predictions, reference.predictions, strict=True))
            agree = f"{same / len(r.predictions):.4f}"
        rows.append(
            f"| `{r.name}` | {shipped} | {statistics.median(r.load_ms):.0f} "
            f"| {r.quantile(1, 0.5):.3f} / {r.quantile(1, 0.99):.3f} "
            f"| {r.quantile(8, 0.5):.3f} / {r.quantile(8, 0.99):.3f} | {8e3 / r.quantile(8, 0.5):,.0f} "
            f"| {r.accuracy:.4f} | {drop} | {agree} |"
        )
    return "\n".join(
        [
            f"Measured on {time.strftime('%Y-%m-%d', time.gmtime())} with `{command}`",
            f"on {machine}; torch {torch.__version__}, 1 torch thread, one fresh process per variant "
            f"and round; {rounds} rounds of {calls} timed forwards per batch size (after {WARMUP_CALLS} "
            "warm-up calls) on real test images; accuracy on all test images.",
            "",
            "| variant | in archive.build | load to first answer, ms | batch 1: median / p99, ms "
            "| batch 8: median / p99, ms | batch 8: images/s | test accuracy | accuracy drop vs fp32, "
            "points | top-1 agreement with fp32 |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def known_candidates() -> list[str]:
    return [*VARIANTS, AOTI]


if __name__ == "__main__":
    print(json.dumps(measure_one(json.loads(sys.argv[1]))))
