"""monitoring.robustness on a tiny random export: the report's shape, its clean baseline, and the
drift monitor's view of an unshifted and an inverted test set. Also the shifts themselves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from handler.monitor import FEATURES
from handler.preprocess import PreprocessSpec
from monitoring import detector, robustness
from monitoring.rules import EPSILON, Thresholds
from monitoring.shifts import NO_LABEL, SHIFTS
from tests.conftest import make_random_export, write_idx_set
from training import data as data_mod
from training.export import reference_stats

TEST_IMAGES = 300  # enough for the rule's real minimum window (200) to be reached within the stream


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random export whose reference statistics are those of the tiny test split itself."""
    root = tmp_path_factory.mktemp("robustness")
    sums = write_idx_set(root / "raw", n_test=TEST_IMAGES)
    data_mod.prepare(root / "data", root / "raw", val_size=60, seed=0, allow_download=False, checksums=sums)
    export = make_random_export(root / "export")
    test = data_mod.load_split(root / "data", "test")
    meta = json.loads((export / "model_meta.json").read_text(encoding="utf-8"))
    # With the evaluated images as the reference, the unshifted PSI must be ~0 for any sample size.
    meta["reference_stats"] = reference_stats(
        test.images, test.labels, torch.rand(len(test)), PreprocessSpec()
    )
    (export / "model_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return export, root / "data"


@pytest.fixture(scope="module")
def report(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    export, data = setup
    out = tmp_path_factory.mktemp("reports")
    doc = out / "monitoring.md"
    doc.write_text(
        "# Monitoring\n\n## Robustness\n\n<!-- robustness:begin -->\nstale table\n<!-- robustness:end -->\n"
    )
    argv = ["--model-dir", str(export), "--data", str(data), "--out", str(out)]
    assert (
        robustness.main([*argv, "--doc", str(doc), "--figure", str(out / "figures" / "robustness.png")]) == 0
    )
    return json.loads((out / "robustness.json").read_text(encoding="utf-8")), out


def test_report_has_every_shift_and_severity_and_a_plot(report: tuple[dict[str, Any], Path]) -> None:
    results, out = report
    assert [s["name"] for s in results["shifts"]] == list(SHIFTS)
    for shift in results["shifts"]:
        assert [r["level"] for r in shift["results"]] == list(SHIFTS[shift["name"]].levels)
        for row in shift["results"]:
            assert 0.0 <= row["accuracy"] <= 1.0, row
            assert set(row["psi"]) == set(FEATURES), row
            assert row["psi_max"] == max(row["psi"].values())
    with Image.open(out / "robustness.png") as plot:
        assert plot.format == "PNG" and plot.width > 500, plot


def test_doc_block_is_replaced_with_the_table_plot_and_command(report: tuple[dict[str, Any], Path]) -> None:
    results, out = report
    text = (out / "monitoring.md").read_text(encoding="utf-8")
    assert "stale table" not in text and results["command"] in text
    assert "](figures/robustness.png)" in text and (out / "figures" / "robustness.png").is_file()
    assert text.count("| inversion (") == len(SHIFTS["inversion"].levels) - 1


def test_severity_zero_is_the_clean_test_set(report: tuple[dict[str, Any], Path]) -> None:
    results, _ = report
    clean = results["shifts"][0]["results"][0]
    for shift in results["shifts"]:
        first = shift["results"][0]
        assert first["accuracy"] == results["clean_accuracy"], shift["name"]
        assert first["psi"] == clean["psi"], shift["name"]


def test_monitor_sees_nothing_on_clean_traffic_and_catches_inversion(
    report: tuple[dict[str, Any], Path],
) -> None:
    results, _ = report
    clean = results["shifts"][0]["results"][0]
    assert clean["psi_max"] < 0.01 and clean["requests_to_alert"] is None, clean
    inverted = next(s for s in results["shifts"] if s["name"] == "inversion")["results"][-1]
    assert inverted["psi_max"] > 1.0, inverted
    # Every window of inverted images is far off, so the rule's minimum window size is the delay.
    assert inverted["requests_to_alert"] == Thresholds.min_requests, inverted


def test_missing_export_names_the_command_that_creates_it(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, data = setup
    argv = ["--model-dir", str(tmp_path / "none"), "--data", str(data), "--out", str(tmp_path), "--no-doc"]
    assert robustness.main(argv) == 2
    assert "python -m training.export" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shift_keeps_shape_and_its_first_level_is_the_identity(name: str) -> None:
    shift = SHIFTS[name]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28)).astype(np.uint8)
    labels = np.arange(6)
    same, same_labels = shift.apply(images, labels, shift.levels[0], rng)
    np.testing.assert_array_equal(same, images)
    np.testing.assert_array_equal(same_labels, labels)
    moved, moved_labels = shift.apply(images, labels, shift.levels[-1], rng)
    assert moved.dtype == np.uint8 and moved.shape == images.shape
    assert not np.array_equal(moved, images), f"{name} at {shift.levels[-1]} left the images unchanged"
    # Only images from another source lose their label: no answer to them is right.
    assert (moved_labels == NO_LABEL).all() if shift.foreign else (moved_labels == labels).all()


def test_detector_psi_is_the_rules_formula() -> None:
    """sum (live - ref) * ln(live / ref), both floored at the rules' EPSILON; one PSI per prefix row."""
    counts = torch.tensor([[0, 5, 10, 85], [25, 25, 25, 25]])
    reference = [0.1, 0.2, 0.3, 0.4]
    expected = []
    for row in counts.tolist():
        live = [max(c / sum(row), EPSILON) for c in row]
        expected.append(sum((a - e) * math.log(a / e) for a, e in zip(live, reference, strict=True)))
    assert detector.psi(counts, reference).tolist() == pytest.approx(expected, rel=1e-12)


def test_requests_to_alert_counts_only_a_crossing_that_lasts() -> None:
    """Reference: uniform over 4 bins. A skewed start that balanced traffic dilutes is no alert."""
    ref = {"features": dict.fromkeys(FEATURES, [0.25] * 4)}
    limits = Thresholds(min_requests=4)
    balanced = torch.arange(400) % 4
    skewed_start = torch.cat([torch.zeros(8, dtype=torch.long), balanced])
    assert detector.requests_to_alert(dict.fromkeys(FEATURES, skewed_start), ref, limits) is None
    # Everything in bin 0: the condition holds from the rule's minimum window on.
    assert (
        detector.requests_to_alert(dict.fromkeys(FEATURES, torch.zeros(50, dtype=torch.long)), ref, limits)
        == 4
    )
