"""What the served model reports about its own traffic: input summary statistics, their bins, the
TorchServe metrics built from them and one JSON prediction-log line per answered request.

Ships inside the .mar next to the handler. The statistics and bins are plain functions, so export
(training/export.py) computes the training reference with exactly the code the server runs:

    >>> stats = input_stats(batch, spec)                 # (N, 1, 28, 28) model input
    >>> stats["brightness"]                              # (N,) mean pixel value per image, in [0, 1]
    >>> MonitorSpec.from_stats(meta.reference_stats).bins("contrast", stats["contrast"].tolist())  # per image

The handler calls `Monitor.observe` once per batch and `Monitor.rejected` per refused request.
Setting FASHION_MONITORING=off in the server's environment turns both off (docs/monitoring.md has
the measured cost of leaving it on). The metric names below are declared, with these dimensions,
in configs/serving/metrics.yaml: TorchServe exports only declared metrics in prometheus mode.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from handler.preprocess import PreprocessSpec

MONITORING_ENV = "FASHION_MONITORING"
FEATURES = ("brightness", "contrast", "white_share")
# A pixel counts as near-white from 230/255 up: garment highlights in Fashion-MNIST, and what a
# white-background photo (the commonest shift: a product shot, not a scan on black) is made of.
NEAR_WHITE = 0.9
FEATURE_BINS = 10
FLUSH_SECONDS = 1.0
# Top-1 confidence bins: fixed, fine at the top where a healthy model's answers sit.
CONFIDENCE_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

# Counter names and the dimensions each is emitted with (configs/serving/metrics.yaml declares them).
BASE_DIMS = ("ModelName", "ModelVersion", "Level")
PREDICTIONS = "fashion_predictions"  # + class
CONFIDENCE = "fashion_confidence_bin"  # + bin
INPUT = "fashion_input_bin"  # + feature, bin
REJECTED = "fashion_rejected"  # + code, error
WORKER_STARTS = "fashion_worker_starts"
METRIC_DIMS = {
    PREDICTIONS: (*BASE_DIMS, "class"),
    CONFIDENCE: (*BASE_DIMS, "bin"),
    INPUT: (*BASE_DIMS, "feature", "bin"),
    REJECTED: (*BASE_DIMS, "code", "error"),
    WORKER_STARTS: BASE_DIMS,
}
# The worker's stdout reaches TorchServe's MODEL_LOG logger line by line; log4j2 sends lines that
# start with this prefix to the prediction log (configs/serving/log4j2.xml, docker/log4j2.xml).
PREDICTION_LOGGER = "fashion.predictions"
PREDICTION_PREFIX = '{"event": "prediction"'


def enabled() -> bool:
    """False when FASHION_MONITORING is off/0/false/no (any case); on by default."""
    return os.environ.get(MONITORING_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}


def input_stats(inputs: torch.Tensor, spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """Normalised model input (N, 1, H, W) -> per-image mean brightness, contrast (std) and
    near-white share, all in pixel units ([0, 1]).

    Computed on the normalised values and mapped back, with numpy on the tensor's own memory: a
    handful of array operations per batch, each a few microseconds. Export calls it on the
    training set, so the reference is binned from exactly these numbers.
    """
    flat = inputs.detach().numpy().reshape(len(inputs), -1)
    white = (NEAR_WHITE - spec.mean) / spec.std
    return {
        # Clipped: mapping back leaves float error around 0 (a black image would read -0.000000).
        "brightness": np.clip(flat.mean(axis=1) * spec.std + spec.mean, 0.0, 1.0),
        "contrast": flat.std(axis=1) * spec.std,
        "white_share": np.count_nonzero(flat >= white, axis=1) / flat.shape[1],
    }


def bin_index(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Bin i holds edges[i] <= v < edges[i+1]; values below/above the range go to the first/last bin."""
    inner = edges[1:-1]
    return [bisect.bisect_right(inner, v) for v in values]


def quantile_edges(values: np.ndarray, bins: int = FEATURE_BINS) -> list[float]:
    """Edges that split `values` into `bins` equally full bins: PSI's best case, no empty bucket."""
    inner = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    # Rounded for a readable metadata file; duplicates (a feature with a big point mass) merge bins.
    cuts = sorted({round(float(c), 4) for c in inner} - {0.0, 1.0})
    return [0.0, *cuts, 1.0]


def histogram(values: np.ndarray | torch.Tensor, edges: Sequence[float]) -> dict[str, list]:
    """{"edges": [...], "counts": [...]} with the server's binning (`bin_index`)."""
    counts = Counter(bin_index(values.tolist(), edges))
    return {"edges": [float(e) for e in edges], "counts": [counts[b] for b in range(len(edges) - 1)]}


def reference_histograms(
    inputs: torch.Tensor, confidences: torch.Tensor, spec: PreprocessSpec
) -> dict[str, dict[str, list]]:
    """What export records in model_meta.json["reference_stats"]["histograms"].

    `inputs`: normalised training images (N, 1, H, W); `confidences`: top-1 probabilities on
    held-out data.
    """
    stats = input_stats(inputs, spec)
    hists = {name: histogram(stats[name], quantile_edges(stats[name])) for name in FEATURES}
    hists["confidence"] = histogram(confidences, CONFIDENCE_EDGES)
    return hists


@dataclass(frozen=True)
class MonitorSpec:
    """Bin edges per feature and for confidence; from model_meta.json when export recorded them."""

    edges: Mapping[str, Sequence[float]] = field(
        default_factory=lambda: {
            **{name: [i / FEATURE_BINS for i in range(FEATURE_BINS + 1)] for name in FEATURES},
            "confidence": list(CONFIDENCE_EDGES),
        }
    )

    @classmethod
    def from_stats(cls, reference_stats: Mapping[str, Any]) -> MonitorSpec:
        """Edges of the reference histograms (`ModelMeta.reference_stats`, the `reference_stats` of
        model_meta.json); equal-width defaults for an export that has none."""
        hists = reference_stats.get("histograms")
        if not hists:
            return cls()
        return cls({name: list(h["edges"]) for name, h in hists.items()})

    def bins(self, name: str, values: Sequence[float]) -> list[int]:
        return bin_index(values, self.edges[name])


class Monitor:
    """Turns answered batches into counter increments and prediction-log lines.

    Counts are added up in the worker and handed to TorchServe once a second by a background
    thread: every counter update is a line the frontend parses, so per-batch updates would cost a
    few dozen lines per batch, while this costs one line per label set per second whatever the
    traffic. Prometheus scrapes every 15-30 s, so the second's delay is invisible.
    """

    def __init__(self, model_name: str, version: str, classes: Sequence[str], spec: MonitorSpec) -> None:
        self.base = (model_name, version, "Model")
        self.classes = list(classes)
        self.spec = spec
        self.log = logging.getLogger(PREDICTION_LOGGER)
        # The constant parts of a prediction-log line, JSON-encoded once (json.dumps per line would
        # be most of the monitoring's cost per request).
        self.line_model = f', "model": {json.dumps(model_name)}, "version": {json.dumps(version)}, "label": '
        self.labels = [json.dumps(name) for name in self.classes]
        self.pending: dict[str, Counter] = {name: Counter() for name in METRIC_DIMS}
        self.lock = threading.Lock()

    def started(self, metrics: Any) -> None:
        """Count the worker start, create every series at 0 (so shares and PSI see all bins), and
        start the flusher."""
        with self.lock:
            self.pending[WORKER_STARTS][()] += 1
            self.pending[PREDICTIONS].update(dict.fromkeys(((c,) for c in self.classes), 0))
            bins = {name: range(len(edges) - 1) for name, edges in self.spec.edges.items()}
            self.pending[CONFIDENCE].update(dict.fromkeys(((str(b),) for b in bins["confidence"]), 0))
            self.pending[INPUT].update({(name, str(b)): 0 for name in FEATURES for b in bins[name]})
        self.flush(metrics)
        threading.Thread(
            target=self._flush_every_second, args=(metrics,), daemon=True, name="metrics"
        ).start()

    def observe(
        self, inputs: torch.Tensor, probs: torch.Tensor, request_ids: Sequence[str], spec: PreprocessSpec
    ) -> None:
        """Record an answered batch: `inputs` (N, 1, H, W) model input, `probs` (N, C)."""
        stats = {name: values.tolist() for name, values in input_stats(inputs, spec).items()}
        confidence, top1 = (t.tolist() for t in probs.max(dim=1))
        with self.lock:
            self.pending[PREDICTIONS].update((self.classes[i],) for i in top1)
            self.pending[CONFIDENCE].update((str(b),) for b in self.spec.bins("confidence", confidence))
            for name in FEATURES:
                self.pending[INPUT].update((name, str(b)) for b in self.spec.bins(name, stats[name]))
        if self.log.isEnabledFor(logging.INFO):
            self._log_predictions(request_ids, top1, confidence, stats)

    def rejected(self, status: int, error: str) -> None:
        with self.lock:
            self.pending[REJECTED][(str(status), error)] += 1

    def flush(self, metrics: Any) -> None:
        """Hand the counts gathered since the last flush to TorchServe's metrics cache."""
        from ts.metrics.dimension import Dimension  # the worker's TorchServe; export does not need it

        with self.lock:
            pending, self.pending = self.pending, {name: Counter() for name in METRIC_DIMS}
        for name, counts in pending.items():
            names = METRIC_DIMS[name]
            for labels, count in counts.items():
                dims = [Dimension(n, v) for n, v in zip(names, (*self.base, *labels), strict=True)]
                metrics.add_counter(name, count, None, dims)

    def _flush_every_second(self, metrics: Any) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush(metrics)

    def _log_predictions(
        self,
        request_ids: Sequence[str],
        top1: list[int],
        confidence: list[float],
        stats: dict[str, list[float]],
    ) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        lines = []
        for row, (request_id, index, conf) in enumerate(zip(request_ids, top1, confidence, strict=True)):
            head = f'{PREDICTION_PREFIX}, "time": "{stamp}", "request_id": {json.dumps(request_id)}'
            head += self.line_model
            values = ", ".join(f'"{name}": {stats[name][row]:.6f}' for name in FEATURES)
            lines.append(
                f'{head}{self.labels[index]}, "index": {index}, "confidence": {conf:.6f}, {values}}}'
            )
        # One record per batch: TorchServe reads the worker's stdout line by line, so each line
        # still becomes its own prediction-log line.
        self.log.info("\n".join(lines))
