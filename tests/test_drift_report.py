"""monitoring.drift_report on prediction logs written by the handler's own Monitor: an HTML report,
drift flagged on a shifted window and not on a clean one, and the documented errors for bad logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handler.monitor import PREDICTION_LOGGER, Monitor, MonitorSpec
from handler.preprocess import PreprocessSpec, normalize
from monitoring import drift_report
from training.data import CLASSES
from training.export import reference_stats

SPEC = PreprocessSpec()


def garments(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy images with a bright band, and model-like probabilities for them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for image, row in zip(images, rng.integers(2, 20, n), strict=True):
        image[row : row + 4, 4 : 4 + rng.integers(8, 20)] = 230
    probs = torch.softmax(torch.from_numpy(rng.normal(0, 2, (n, len(CLASSES)))), dim=1)
    return torch.from_numpy(images), probs


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_meta.json whose reference is what export records for 2000 such images."""
    images, probs = garments(2000, seed=0)
    confidence, top1 = probs.max(dim=1)
    meta = {
        "name": "fashion_mnist",
        "version": "1.0",
        "classes": CLASSES,
        "preprocess": SPEC.to_meta(),
        "reference_stats": reference_stats(images, top1, confidence, SPEC),
    }
    path = tmp_path_factory.mktemp("export") / "model_meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


@pytest.fixture
def write_log(meta_file: Path) -> Iterator[Any]:
    """write_log(path, images, probs): the prediction lines the real handler Monitor writes for them."""
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    logger = logging.getLogger(PREDICTION_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)

    def write(path: Path, images: torch.Tensor, probs: torch.Tensor) -> Path:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        try:
            monitor = Monitor(
                meta["name"], meta["version"], CLASSES, MonitorSpec.from_stats(meta["reference_stats"])
            )
            ids = [f"req-{i}" for i in range(len(images))]
            monitor.observe(normalize(images, SPEC), probs.float(), ids, SPEC)
        finally:
            logger.removeHandler(handler)
            handler.close()
        return path

    yield write
    logger.setLevel(level)


def run(log: Path, meta_file: Path, out: Path, *extra: str) -> tuple[int, dict[str, Any] | None]:
    code = drift_report.main(["--log", str(log), "--meta", str(meta_file), "--out", str(out), *extra])
    summary = out.with_suffix(".json")
    return code, json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None


def test_clean_window_gives_a_report_without_drift(tmp_path: Path, meta_file: Path, write_log: Any) -> None:
    log = write_log(tmp_path / "predictions.log", *garments(400, seed=1))
    code, summary = run(log, meta_file, tmp_path / "reports" / "drift.html")
    assert code == 0 and summary is not None
    assert summary["requests"] == 400 and not summary["input_drift"], summary
    assert set(summary["psi"]) == set(drift_report.COLUMNS)
    html = (tmp_path / "reports" / "drift.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:500].lower()
    assert "brightness_bin" in html


def test_shifted_window_is_flagged(tmp_path: Path, meta_file: Path, write_log: Any) -> None:
    images, probs = garments(400, seed=2)
    log = write_log(tmp_path / "predictions.log", 255 - images, probs)
    code, summary = run(log, meta_file, tmp_path / "drift.html")
    assert code == 0 and summary is not None
    assert summary["input_drift"], summary
    # Inversion keeps each image's spread (contrast) and moves its brightness and white share.
    assert {"brightness_bin", "white_share_bin"} <= set(summary["drifted"]), summary
    assert "contrast_bin" not in summary["drifted"], summary


def test_window_keeps_the_last_requests_of_the_model(tmp_path: Path, meta_file: Path, write_log: Any) -> None:
    """A clean hour followed by inverted traffic: --last selects only the shifted tail."""
    clean = write_log(tmp_path / "clean.log", *garments(300, seed=3)).read_text(encoding="utf-8")
    images, probs = garments(300, seed=4)
    shifted = write_log(tmp_path / "shifted.log", 255 - images, probs).read_text(encoding="utf-8")
    other = json.loads(clean.splitlines()[0]) | {"version": "0.9"}
    log = tmp_path / "predictions.log"
    log.write_text("TorchServe started\n" + clean + json.dumps(other) + "\n" + shifted)
    _, everything = run(log, meta_file, tmp_path / "all.html")
    _, tail = run(log, meta_file, tmp_path / "tail.html", "--last", "300")
    assert everything is not None and everything["requests"] == 600
    assert tail is not None and tail["requests"] == 300 and tail["input_drift"], tail


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("", "no prediction lines"),
        ("2026-12-01 INFO some server line\n", "no prediction lines"),
        (
            '{"event": "prediction", "time": "2026-12-01T14:00:00.000Z"\n',
            ":1 is not a valid prediction record",
        ),
        (
            '{"event": "prediction", "time": "2026-12-01T14:00:00.000Z", "model": "fashion_mnist"}\n',
            "missing field",
        ),
    ],
)
def test_bad_log_exits_2_naming_the_fix(
    tmp_path: Path, meta_file: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    log = tmp_path / "predictions.log"
    if content is not None:
        log.write_text(content, encoding="utf-8")
    code, summary = run(log, meta_file, tmp_path / "drift.html")
    err = capsys.readouterr().err
    assert code == 2 and summary is None
    assert message in err and "--log" in err, err


def test_record_with_out_of_range_statistic_names_the_line(
    tmp_path: Path, meta_file: Path, write_log: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = write_log(tmp_path / "ok.log", *garments(3, seed=5)).read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[1]) | {"brightness": 7.5}
    log = tmp_path / "predictions.log"
    log.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n", encoding="utf-8")
    assert run(log, meta_file, tmp_path / "drift.html")[0] == 2
    err = capsys.readouterr().err
    assert f"{log}:2" in err and "brightness" in err, err


def test_empty_window_and_foreign_model_say_what_to_change(
    tmp_path: Path, meta_file: Path, write_log: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write_log(tmp_path / "predictions.log", *garments(5, seed=6))
    assert run(log, meta_file, tmp_path / "a.html", "--since", "2999-01-01T00:00:00Z")[0] == 2
    assert "--since/--until" in capsys.readouterr().err
    other = json.loads(meta_file.read_text(encoding="utf-8")) | {"version": "2.0"}
    other_meta = tmp_path / "model_meta.json"
    other_meta.write_text(json.dumps(other), encoding="utf-8")
    assert run(log, other_meta, tmp_path / "b.html")[0] == 2
    assert "none of fashion_mnist 2.0" in capsys.readouterr().err
