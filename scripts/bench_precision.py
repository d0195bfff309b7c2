"""Measure training in fp32 against bf16 mixed precision on this CPU; write the figures to docs/training.md.

    .venv/bin/python -m scripts.bench_precision                      # 300 steps per precision
    .venv/bin/python -m scripts.bench_precision --steps 100 --data-root /tmp/fm

Trains the default config (python -m training.train) for the same number of steps once per
precision, in one process, alternating the order over --rounds so a change in machine load
hits both alike, and records training images/s (steps after the first 10, validation excluded)
and validation accuracy after the steps. The machine may be shared: compare the ratio, which is
measured under the same conditions, rather than the absolute rates. Replaces the block between
the markers in docs/training.md and leaves the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from training.config import register_configs
from training.train import CONFIG_DIR, train

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ("32-true", "bf16-mixed")
WARMUP_STEPS = 10
# The marked block convention of docs/training.md: scripts/bench_training.py keeps such blocks.
BEGIN, END = "<!-- bench_precision:begin -->", "<!-- bench_precision:end -->"


class StepTimer(L.Callback):
    """Wall time of the training steps after the warm-up: the forward, backward and optimiser step."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= WARMUP_STEPS:
            self.seconds += time.perf_counter() - self._t0
            self.steps += 1


def measure(precision: str, steps: int, data_root: Path, scratch: Path) -> dict:
    overrides = [
        f"trainer.precision={precision}", "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}",
        "trainer.progress_bar=false", "logger=csv", f"data.root={data_root}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    timer = StepTimer()
    summary = train(cfg, scratch / f"{precision}-{time.monotonic_ns()}", callbacks=[timer])
    return {
        "precision": precision,
        "batch": cfg.data.batch_size,
        "images_per_s": timer.steps * cfg.data.batch_size / timer.seconds,
        "val_acc": summary["best_val_acc"],
        "load": os.getloadavg()[0],
    }


def write_doc(results: list[dict], steps: int, argv: list[str], doc: Path) -> None:
    by = {p: [r for r in results if r["precision"] == p] for p in PRECISIONS}
    rate = {p: sum(r["images_per_s"] for r in rs) / len(rs) for p, rs in by.items()}
    acc = {p: rs[-1]["val_acc"] for p, rs in by.items()}
    rows = "\n".join(
        f"| `trainer.precision={p}` | {rate[p]:.0f} | {rate[p] / rate['32-true']:.2f}x | {acc[p]:.4f} |"
        for p in PRECISIONS
    )
    runs = ", ".join(
        f"{r['precision']} {r['images_per_s']:.0f} images/s (load {r['load']:.1f})" for r in results
    )
    faster = rate["bf16-mixed"] > rate["32-true"]
    no_worse = acc["bf16-mixed"] >= acc["32-true"] - 0.002
    verdict = (
        "bf16-mixed wins on both counts, so it is the default."
        if faster and no_worse
        else "bf16-mixed does not win here ("
        + ("slower" if not faster else "less accurate")
        + "), so fp32 (`32-true`) stays the default; `trainer.precision=bf16-mixed` is there for\n"
        "hardware where it pays, such as GPUs with bf16 tensor cores."
    )
    command = shlex.join(["python", "-m", "scripts.bench_precision", *argv])
    bf16 = "yes" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    block = f"""{BEGIN}
## Mixed precision (bf16) against fp32

Measured by `{command}` on {time.strftime("%Y-%m-%d %H:%M")},
{os.cpu_count()} CPU cores ({platform.machine()}, oneDNN bf16 kernels: {bf16}), torch {torch.__version__}:
the default config, {steps} training steps of {results[0]["batch"]} images per precision, then the
whole validation set. Images/s counts training steps only, after {WARMUP_STEPS} warm-up steps.

| precision | train images/s | vs fp32 | val acc after {steps} steps |
|---|---|---|---|
{rows}

Runs in order, with the 1-minute load average after each: {runs}. They alternated and shared the
machine with other work, so the absolute rates are low and vary; the ratio, measured under the
same conditions, is what carries over.
{verdict}
{END}"""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if BEGIN in text and END in text:
        text = text.split(BEGIN)[0] + block + text.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (> 10)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per precision, alternating the order")
    parser.add_argument("--data-root", type=Path, default=REPO / "data", help="processed data (data.root)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "training.md")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS or args.rounds < 1:
        parser.error(f"--steps must exceed {WARMUP_STEPS} and --rounds be at least 1")
    register_configs()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as scratch:
        for round_ in range(args.rounds):
            order = PRECISIONS if round_ % 2 == 0 else PRECISIONS[::-1]
            for precision in order:
                result = measure(precision, args.steps, args.data_root, Path(scratch))
                print(f"{precision}: {result['images_per_s']:.0f} images/s, val acc {result['val_acc']:.4f}")
                results.append(result)
    write_doc(results, args.steps, sys.argv[1:], args.doc)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
