"""training/bench.py, the library behind scripts/bench_{training,loading,precision}.py: what it keeps
of docs/training.md when it rewrites it. Pure functions on made-up figures; nothing is measured.

    python -m pytest tests/test_training_bench.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training import bench
from training.cli import EXIT_USAGE, StageError


def figures(name: str, accuracy: float) -> dict:
    curve = {"train/loss_epoch": [0.5], "val/acc": [accuracy], "val/loss": [0.4]}
    return {
        "name": name, "command": f"python -m training.train {name}", "test_accuracy": accuracy,
        "val_accuracy": accuracy, "train_seconds": 60.0, "epochs": 1, "seconds_per_epoch": 60.0,
        "peak_rss_mb": 900, "params": 1234, "measured_on": "2026-12-01 10:00", "load_average_1m_at_end": 1.0,
        "curve": curve,
    }  # fmt: skip


def test_rewriting_the_training_doc_keeps_every_marked_block() -> None:
    blocks = [
        "<!-- bench_loading:begin -->\n## Data loading\nfigures\n<!-- bench_loading:end -->",
        "<!-- distributed_training:begin -->\nhand-written\n<!-- distributed_training:end -->",
    ]
    old = f"# Training figures\n\nold table\n\n{blocks[0]}\n\nbetween\n\n{blocks[1]}\n"
    new = bench.render_training([figures("default", 0.91)], 3.0, "python -m scripts.bench_training", old)
    assert all(block in new for block in blocks), new
    assert "old table" not in new and "between" not in new
    assert "Measured by `python -m scripts.bench_training`" in new and "| 0.9100 |" in new


def test_fresh_figures_replace_only_their_own_config() -> None:
    previous = [figures("default", 0.90), figures("accurate", 0.94)]
    fresh = {"default": figures("default", 0.92)}
    assert bench.merge_results(fresh, previous) == [fresh["default"], previous[1]]
    assert bench.merge_results({"accurate": previous[1]}, []) == [previous[1]]


def test_a_doc_without_the_markers_is_a_usage_error(tmp_path: Path) -> None:
    doc = tmp_path / "training.md"
    doc.write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(StageError, match="bench_loading:begin") as refused:
        bench.write_figures(doc, "bench_loading", "figures")
    assert refused.value.exit_code == EXIT_USAGE
    doc.write_text("a\n<!-- bench_loading:begin -->\nold\n<!-- bench_loading:end -->\nb\n", encoding="utf-8")
    bench.write_figures(doc, "bench_loading", "new")
    assert (
        doc.read_text(encoding="utf-8")
        == "a\n<!-- bench_loading:begin -->\nnew\n<!-- bench_loading:end -->\nb\n"
    )


@pytest.mark.parametrize("native", [True, False])
def test_the_precision_verdict_names_what_auto_does_on_this_cpu(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(bench, "native_bf16", lambda accelerator: native)
    results = [
        {"precision": p, "batch": 256, "images_per_s": rate, "val_acc": 0.85, "load": 1.0}
        for p, rate in (("32-true", 1000.0), ("bf16-mixed", 1900.0))
    ]
    text = bench.render_precision(results, 60, "python -m scripts.bench_precision")
    assert "| `trainer.precision=bf16-mixed` | 1900 | 1.90x | 0.8500 |" in text
    assert "bf16-mixed trained 1.90x the images/s of fp32 here" in text
    expected = "trains in bf16-mixed on it" if native else "keeps fp32 on it"
    assert expected in text and f"native bf16, AMX or AVX512-BF16: {'yes' if native else 'no'}" in text
