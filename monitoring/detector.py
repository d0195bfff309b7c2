"""The online drift detector's arithmetic in Python: what the generated InputDrift rule computes.

A library module (no command line), used by `python -m monitoring.robustness` and
`python -m monitoring.drift_report`:

    >>> ref = monitoring.rules.reference(meta)                 # reference shares per feature bin
    >>> stats = input_stats(batch, spec)                        # handler.monitor, on model input
    >>> bins = feature_bins(stats, MonitorSpec.from_stats(meta["reference_stats"]))  # per image and feature
    >>> feature_psi(bins, ref)                                  # {"brightness": 0.01, ...}
    >>> requests_to_alert(bins, ref, Thresholds())              # first request count that alerts

The bins are the handler's (handler.monitor), the reference shares and the epsilon floor are the
rules' (monitoring.rules), and `psi` is the formula of the `fashion:input_psi:window` recording
rule, so offline figures and live alerts use one definition.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from handler.monitor import FEATURES, MonitorSpec
from handler.preprocess import PreprocessSpec
from monitoring.rules import EPSILON, Thresholds, reference


def export_specs(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any], PreprocessSpec, MonitorSpec]:
    """What offline drift figures of an export start from: its model_meta.json, the rules' reference
    shares (RulesError if it has none), its preprocessing and the handler's bins."""
    meta = json.loads((model_dir / "model_meta.json").read_text(encoding="utf-8"))
    shares = reference(meta)
    return meta, shares, PreprocessSpec.from_meta(meta), MonitorSpec.from_stats(meta["reference_stats"])


def psi(counts: torch.Tensor, reference_shares: Sequence[float]) -> torch.Tensor:
    """Population stability index of live bin `counts` (..., B) against the reference shares (B,).

    Both sides are floored at EPSILON, as the rules floor them (an empty bin would give ln 0).
    Leading dimensions are kept: (n, B) cumulative counts give one PSI per request count.
    """
    counts = counts.to(torch.float64)
    total = counts.sum(dim=-1, keepdim=True)
    live = (counts / total.clamp_min(1.0)).clamp_min(EPSILON)
    ref = torch.tensor(reference_shares, dtype=torch.float64).clamp_min(EPSILON)
    return ((live - ref) * torch.log(live / ref)).sum(dim=-1)


def feature_bins(stats: Mapping[str, Sequence[float]], spec: MonitorSpec) -> dict[str, torch.Tensor]:
    """Per-image input statistics (handler.monitor.input_stats) -> the bin the server counts each in."""
    return {name: torch.tensor(spec.bins(name, list(stats[name])), dtype=torch.long) for name in FEATURES}


def feature_psi(bins: Mapping[str, torch.Tensor], ref: Mapping[str, Any]) -> dict[str, float]:
    """PSI per input feature of a window of images (their `feature_bins`) against the reference."""
    shares = ref["features"]
    return {
        name: float(psi(torch.bincount(bins[name], minlength=len(shares[name])), shares[name]))
        for name in FEATURES
    }


def requests_to_alert(
    bins: Mapping[str, torch.Tensor], ref: Mapping[str, Any], limits: Thresholds
) -> int | None:
    """How many of these requests, in this order, the window needs for InputDrift's condition to last.

    The condition is the rule's: some feature's PSI above `limits.psi` while the window holds at
    least `limits.min_requests` requests. The answer is the smallest count from which on it holds
    for every larger window of the stream, so a noisy early crossing that the whole stream does
    not confirm counts for nothing (the alert's `for` duration asks for a condition that lasts).
    None when it does not hold over all the given requests.
    """
    worst = None
    for name in FEATURES:
        size = len(ref["features"][name])
        cumulative = torch.nn.functional.one_hot(bins[name], size).cumsum(dim=0)
        scores = psi(cumulative, ref["features"][name])
        worst = scores if worst is None else torch.maximum(worst, scores)
    if worst is None:
        return None
    counts = torch.arange(1, len(worst) + 1)
    holds = (worst > limits.psi) & (counts >= limits.min_requests)
    if not holds[-1]:
        return None
    fails = (~holds).nonzero()
    return int(counts[fails[-1, 0] + 1]) if len(fails) else 1
