"""What the served model reports about its own traffic: input summary statistics, their bins, the
TorchServe metrics built from them and one JSON prediction-log line per answered request.

Ships inside the .mar next to the handler. The statistics and bins are plain functions, so export
(training/export.py) computes the training reference with exactly the code the server runs:

    >>> pixels = to_pixels(batch, spec)                  # (N, 1, 28, 28) model input -> [0, 1] pixels
    >>> input_stats(pixels)["brightness"]                # (N,) mean pixel value per image
    >>> MonitorSpec.from_meta(meta).bins("contrast", stats["contrast"])   # (N,) bin index per image

The handler calls `Monitor.observe` once per batch and `Monitor.rejected` per refused request.
Setting FASHION_MONITORING=off in the server's environment turns both off (docs/monitoring.md has
the measured cost of leaving it on). The metric names below are declared, with these dimensions,
in configs/serving/metrics.yaml: TorchServe exports only declared metrics in prometheus mode.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from handler.preprocess import PreprocessSpec

MONITORING_ENV = "FASHION_MONITORING"
FEATURES = ("brightness", "contrast", "white_share")
# A pixel counts as near-white from 230/255 up: garment highlights in Fashion-MNIST, and what a
# white-background photo (the commonest shift: a product shot, not a scan on black) is made of.
NEAR_WHITE = 0.9
FEATURE_BINS = 10
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


def to_pixels(inputs: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Normalised model input (N, 1, H, W) -> pixel values in [0, 1], shape (N, H*W)."""
    return (inputs.reshape(len(inputs), -1) * spec.std + spec.mean).clamp_(0.0, 1.0)


def input_stats(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, P) pixels in [0, 1] -> per-image mean brightness, contrast (std) and near-white share."""
    pixels = pixels.to(torch.float32)
    return {
        "brightness": pixels.mean(dim=1),
        "contrast": pixels.std(dim=1, correction=0),
        "white_share": (pixels >= NEAR_WHITE).to(torch.float32).mean(dim=1),
    }


def bin_index(values: torch.Tensor, edges: Sequence[float]) -> torch.Tensor:
    """Bin i holds edges[i] <= v < edges[i+1]; values below/above the range go to the first/last bin."""
    inner = torch.tensor(edges[1:-1], dtype=values.dtype)
    return torch.bucketize(values, inner, right=True)


def quantile_edges(values: torch.Tensor, bins: int = FEATURE_BINS) -> list[float]:
    """Edges that split `values` into `bins` equally full bins: PSI's best case, no empty bucket."""
    inner = torch.quantile(
        values.to(torch.float64), torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    )
    # Rounded for a readable metadata file; duplicates (a feature with a big point mass) merge bins.
    cuts = sorted({round(float(c), 4) for c in inner} - {0.0, 1.0})
    return [0.0, *cuts, 1.0]


def histogram(values: torch.Tensor, edges: Sequence[float]) -> dict[str, list]:
    """{"edges": [...], "counts": [...]} with the server's binning (`bin_index`)."""
    counts = torch.bincount(bin_index(values.to(torch.float32), edges), minlength=len(edges) - 1)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def reference_histograms(pixels: torch.Tensor, confidences: torch.Tensor) -> dict[str, dict[str, list]]:
    """What export records in model_meta.json["reference_stats"]["histograms"].

    `pixels`: (N, P) training images in [0, 1]; `confidences`: top-1 probabilities on held-out data.
    """
    stats = input_stats(pixels)
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
    def from_meta(cls, meta: Mapping[str, Any]) -> MonitorSpec:
        """Edges of the reference histograms; equal-width defaults for an export that has none."""
        hists = meta.get("reference_stats", {}).get("histograms")
        if not hists:
            return cls()
        return cls({name: list(h["edges"]) for name, h in hists.items()})

    def bins(self, name: str, values: torch.Tensor) -> torch.Tensor:
        return bin_index(values, self.edges[name])


class Monitor:
    """Turns one answered batch into counter increments and prediction-log lines."""

    def __init__(self, model_name: str, version: str, classes: Sequence[str], spec: MonitorSpec) -> None:
        self.base = (model_name, version, "Model")
        self.classes = list(classes)
        self.spec = spec
        self.log = logging.getLogger(PREDICTION_LOGGER)

    def started(self, metrics: Any) -> None:
        """Count the worker start and create every series at 0, so shares and PSI have all bins."""
        self._emit(metrics, WORKER_STARTS, Counter({(): 1}))
        self._emit(metrics, PREDICTIONS, Counter(dict.fromkeys(((c,) for c in self.classes), 0)))
        bins = {name: range(len(edges) - 1) for name, edges in self.spec.edges.items()}
        self._emit(metrics, CONFIDENCE, Counter(dict.fromkeys(((str(b),) for b in bins["confidence"]), 0)))
        zero = {(name, str(b)): 0 for name in FEATURES for b in bins[name]}
        self._emit(metrics, INPUT, Counter(zero))

    def observe(
        self,
        metrics: Any,
        inputs: torch.Tensor,
        probs: torch.Tensor,
        request_ids: Sequence[str],
        spec: PreprocessSpec,
    ) -> None:
        """Record an answered batch: `inputs` (N, 1, H, W) model input, `probs` (N, C)."""
        stats = input_stats(to_pixels(inputs, spec))
        confidence, top1 = probs.max(dim=1)
        # One counter update per distinct label set in the batch: each update is a line the
        # frontend parses, so a batch of 8 costs at most a few dozen, not 8 x 5.
        predicted = Counter((self.classes[i],) for i in top1.tolist())
        conf_bins = Counter((str(b),) for b in self.spec.bins("confidence", confidence).tolist())
        inputs_binned: Counter = Counter()
        for name in FEATURES:
            inputs_binned.update((name, str(b)) for b in self.spec.bins(name, stats[name]).tolist())
        self._emit(metrics, PREDICTIONS, predicted)
        self._emit(metrics, CONFIDENCE, conf_bins)
        self._emit(metrics, INPUT, inputs_binned)
        if self.log.isEnabledFor(logging.INFO):
            self._log_predictions(request_ids, top1.tolist(), confidence.tolist(), stats)

    def rejected(self, metrics: Any, status: int, error: str) -> None:
        self._emit(metrics, REJECTED, Counter({(str(status), error): 1}))

    def _emit(self, metrics: Any, name: str, counts: Counter) -> None:
        from ts.metrics.dimension import Dimension  # the worker's TorchServe; not needed by export

        names = METRIC_DIMS[name]
        for labels, count in counts.items():
            values = (*self.base, *labels)
            metrics.add_counter(
                name, count, None, [Dimension(n, v) for n, v in zip(names, values, strict=True)]
            )

    def _log_predictions(
        self,
        request_ids: Sequence[str],
        top1: list[int],
        confidence: list[float],
        stats: dict[str, torch.Tensor],
    ) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        columns = {name: stats[name].tolist() for name in FEATURES}
        for row, (request_id, index, conf) in enumerate(zip(request_ids, top1, confidence, strict=True)):
            line = {
                "event": "prediction",
                "time": stamp,
                "request_id": request_id,
                "model": self.base[0],
                "version": self.base[1],
                "label": self.classes[index],
                "index": index,
                "confidence": round(conf, 6),
                **{name: round(columns[name][row], 6) for name in FEATURES},
            }
            self.log.info(json.dumps(line))
