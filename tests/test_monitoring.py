"""The handler's model monitoring without a server: statistics, bins, the counter updates it hands to
TorchServe's real metrics cache (configured with the project's metrics.yaml), the prediction log,
and that answers are the same with monitoring on and off. Plus the offline check behind the drift
alert's threshold: shifted real test images move PSI past it, clean ones do not.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.service import Service

from archive.selfcheck import WorkerRequest, predict
from handler import monitor
from handler.fashion_handler import FashionMNISTHandler
from handler.preprocess import PreprocessSpec, normalize
from monitoring.rules import EPSILON, Thresholds
from serving.images import encode as png_bytes
from tests.conftest import make_random_export
from training.data import CLASSES, load_split

REPO = Path(__file__).resolve().parent.parent
METRICS_YAML = REPO / "configs" / "serving" / "metrics.yaml"
METRIC_LINE = re.compile(r"\[METRICS\](?P<name>\w+)\.Count:(?P<value>[0-9.]+)\|#(?P<dims>[^|]*)\|")


def metrics_cache() -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    cache.model_name = "fashion_mnist"
    return cache


def emitted(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, str], float]]:
    """The [METRICS] lines TorchServe's metrics cache wrote: (name, dimensions, value)."""
    out = []
    for record in caplog.records:
        if match := METRIC_LINE.match(record.getMessage()):
            dims = dict(pair.split(":", 1) for pair in match["dims"].split(","))
            out.append((match["name"], dims, float(match["value"])))
    return out


def test_metrics_yaml_declares_what_the_handler_emits() -> None:
    declared = yaml.safe_load(METRICS_YAML.read_text())["model_metrics"]["counter"]
    assert {m["name"]: tuple(m["dimensions"]) for m in declared} == monitor.METRIC_DIMS


def test_input_stats_of_known_images() -> None:
    spec = PreprocessSpec()
    black = torch.zeros(28, 28, dtype=torch.uint8)
    half = black.clone()
    half[:14] = 255
    dim = torch.full((28, 28), 51, dtype=torch.uint8)  # 0.2
    stats = monitor.input_stats(normalize(torch.stack([black, half, dim]), spec), spec)
    expected = {"brightness": [0.0, 0.5, 0.2], "contrast": [0.0, 0.5, 0.0], "white_share": [0.0, 0.5, 0.0]}
    for name, values in expected.items():
        assert stats[name].tolist() == pytest.approx(values, abs=1e-5), name


def test_bins_cover_every_value_and_match_the_histogram() -> None:
    edges = [0.0, 0.2, 0.5, 1.0]
    values = torch.tensor([-0.1, 0.0, 0.19, 0.2, 0.7, 1.0, 1.5])
    assert monitor.bin_index(values.tolist(), edges) == [0, 0, 0, 1, 2, 2, 2]
    assert monitor.histogram(values, edges) == {"edges": edges, "counts": [3, 1, 3]}


def test_quantile_edges_split_the_reference_evenly() -> None:
    values = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    hist = monitor.histogram(values, monitor.quantile_edges(values))
    assert len(hist["counts"]) == monitor.FEATURE_BINS
    assert all(abs(c - 1000) <= 2 for c in hist["counts"]), hist


def test_spec_uses_the_exported_edges_and_falls_back_without_them() -> None:
    hists = {name: {"edges": [0.0, 0.3, 1.0], "counts": [1, 1]} for name in (*monitor.FEATURES, "confidence")}
    assert monitor.MonitorSpec.from_stats({"histograms": hists}).edges["contrast"] == [
        0.0,
        0.3,
        1.0,
    ]
    default = monitor.MonitorSpec.from_stats({})
    assert len(default.edges["brightness"]) == monitor.FEATURE_BINS + 1
    assert default.edges["confidence"] == list(monitor.CONFIDENCE_EDGES)


def test_observe_counts_each_request_once_per_metric(caplog: pytest.LogCaptureFixture) -> None:
    spec = PreprocessSpec()
    mon = monitor.Monitor("fashion_mnist", "2.0", CLASSES, monitor.MonitorSpec())
    cache = metrics_cache()
    pixels = torch.tensor(np.random.default_rng(0).integers(0, 256, (5, 28, 28)), dtype=torch.uint8)
    probs = torch.softmax(torch.randn(5, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    with caplog.at_level(logging.INFO):
        mon.observe(normalize(pixels[:3], spec), probs[:3], ["r0", "r1", "r2"], spec)
        mon.observe(normalize(pixels[3:], spec), probs[3:], ["r3", "r4"], spec)
        mon.rejected(413, "image_too_large")
        assert not emitted(caplog), "counts wait for the flush"
        mon.flush(cache)
    lines = emitted(caplog)
    for name, dims, _ in lines:
        assert tuple(dims)[: len(monitor.METRIC_DIMS[name])] == monitor.METRIC_DIMS[name], (name, dims)
        assert (dims["ModelName"], dims["ModelVersion"]) == ("fashion_mnist", "2.0")
    # One update per label set, carrying the count of both batches.
    assert len({(n, tuple(d.items())) for n, d, _ in lines}) == len(lines)
    total = lambda name, **match: sum(  # noqa: E731
        v for n, d, v in lines if n == name and all(d[k] == x for k, x in match.items())
    )
    assert total(monitor.PREDICTIONS) == total(monitor.CONFIDENCE) == 5
    assert [total(monitor.INPUT, feature=f) for f in monitor.FEATURES] == [5, 5, 5]
    assert total(monitor.REJECTED, code="413", error="image_too_large") == 1
    top1 = probs.argmax(1).tolist()
    assert total(monitor.PREDICTIONS, **{"class": CLASSES[top1[0]]}) == top1.count(top1[0])
    log = [
        json.loads(line)
        for r in caplog.records
        if r.name == monitor.PREDICTION_LOGGER
        for line in r.getMessage().splitlines()
    ]
    assert [entry["request_id"] for entry in log] == [f"r{i}" for i in range(5)]
    assert set(log[0]) == {
        "event", "time", "request_id", "model", "version", "label", "index", "confidence", *monitor.FEATURES,
    }  # fmt: skip
    assert all(line.startswith(monitor.PREDICTION_PREFIX) for r in caplog.records
               if r.name == monitor.PREDICTION_LOGGER for line in r.getMessage().splitlines())  # fmt: skip


def test_started_creates_every_series_at_zero(caplog: pytest.LogCaptureFixture) -> None:
    mon = monitor.Monitor("fashion_mnist", "1.0", CLASSES, monitor.MonitorSpec())
    with caplog.at_level(logging.INFO):
        mon.started(metrics_cache())
    lines = emitted(caplog)
    assert sum(v for n, _, v in lines if n == monitor.WORKER_STARTS) == 1
    assert {d["class"] for n, d, _ in lines if n == monitor.PREDICTIONS} == set(CLASSES)
    bins = {(d["feature"], d["bin"]) for n, d, v in lines if n == monitor.INPUT and v == 0}
    assert len(bins) == len(monitor.FEATURES) * monitor.FEATURE_BINS


def load(model_dir: Path) -> tuple[Service, FashionMNISTHandler]:
    handler = FashionMNISTHandler()
    manifest = {"model": {"modelName": "fashion_mnist", "serializedFile": "model.pt", "handler": "h.py"}}
    service = Service(
        "fashion_mnist", str(model_dir), manifest, handler.handle, None, 8, True, metrics_cache()
    )
    handler.initialize(service.context)
    return service, handler


@pytest.mark.parametrize("setting", ["on", "off"])
def test_answers_are_the_same_with_monitoring_on_and_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, setting: str
) -> None:
    export = make_random_export(tmp_path / "export")
    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28)).astype(np.uint8)
    batch = [WorkerRequest.raw(png_bytes(i), "image/png") for i in images] + [WorkerRequest.raw(b"junk")]
    saved = torch.get_num_threads()
    monkeypatch.setenv(monitor.MONITORING_ENV, "off")
    baseline = [a.body for a in predict(load(export)[0], batch)]
    monkeypatch.setenv(monitor.MONITORING_ENV, setting)
    with caplog.at_level(logging.INFO):
        service, handler = load(export)
        answers = [a.body for a in predict(service, batch)]
        if handler.monitor:
            handler.monitor.flush(service.context.metrics)
    torch.set_num_threads(saved)
    assert answers == baseline
    names = {name for name, _, _ in emitted(caplog)}
    if setting == "on":
        assert names == set(monitor.METRIC_DIMS), names
    else:
        assert not names & set(monitor.METRIC_DIMS)


@pytest.fixture(scope="module")
def reference_shares(real_data_root: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Edges and shares of the training reference, as export computes them."""
    spec = PreprocessSpec()
    hists = monitor.reference_histograms(normalize(load_split(real_data_root, "train").images[:20_000], spec),
                                         torch.ones(1), spec)  # fmt: skip
    return {name: (hists[name]["edges"], [c / sum(hists[name]["counts"]) for c in hists[name]["counts"]])
            for name in monitor.FEATURES}  # fmt: skip


def window_psi(images: np.ndarray, reference: dict[str, tuple[list[float], list[float]]]) -> dict[str, float]:
    spec = PreprocessSpec()
    stats = monitor.input_stats(normalize(torch.from_numpy(images), spec), spec)
    out = {}
    for name, (edges, ref) in reference.items():
        live = monitor.histogram(stats[name], edges)["counts"]
        shares = [max(c / len(images), EPSILON) for c in live]
        out[name] = sum(
            (a - max(e, EPSILON)) * math.log(a / max(e, EPSILON)) for a, e in zip(shares, ref, strict=True)
        )
    return out


SHIFTS = {
    "clean": lambda x, rng: x,
    "inverted": lambda x, rng: 255 - x,
    "darkened": lambda x, rng: x * 0.5,
    "brightened": lambda x, rng: x * 0.6 + 100,
    "noisy": lambda x, rng: x + rng.normal(0, 60, x.shape),
}


@pytest.mark.parametrize("shift", list(SHIFTS))
def test_shifted_windows_cross_the_psi_threshold_and_clean_ones_do_not(
    shift: str, real_data_root: Path, reference_shares: dict
) -> None:
    rng = np.random.default_rng(0)
    test = load_split(real_data_root, "test").images.numpy()
    # Five windows of the alert's minimum size, from different parts of the test set.
    for start in range(0, 5 * Thresholds.min_requests, Thresholds.min_requests):
        window = test[start : start + Thresholds.min_requests].astype(np.float64)
        images = np.clip(SHIFTS[shift](window, rng), 0, 255).astype(np.uint8)
        worst = max(window_psi(images, reference_shares).values())
        if shift == "clean":
            assert worst < Thresholds.psi, f"clean window at {start}: PSI {worst:.3f}"
        else:
            assert worst > Thresholds.psi, f"{shift} window at {start}: PSI {worst:.3f}"


def test_make_monitor_names_the_fix_when_no_server_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from monitoring import stack

    assert stack.main(["--state-dir", str(tmp_path), "--work", str(tmp_path / "monitor")]) == 1
    assert "python -m scripts.serve start" in capsys.readouterr().err
