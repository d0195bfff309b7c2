"""Model output -> the JSON body each client gets back. Pure functions, no server needed:

>>> classes = class_names(json.load(open("artifacts/model/index_to_name.json")))
>>> probs = probabilities(model(batch))          # (N, C), each row sums to 1
>>> prediction_body(probs[0], classes, 2, "fashion_mnist", "1.0")
{'model': 'fashion_mnist', 'version': '1.0',
 'predictions': [{'label': 'Bag', 'index': 8, 'probability': 0.93}, {'label': ..., ...}]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def class_names(index_to_name: Mapping[str, str]) -> list[str]:
    """index_to_name.json ({"0": "T-shirt/top", ...}) -> names in index order.

    Raises ValueError unless the keys are exactly "0".."n-1", so a gap never shifts labels.
    """
    expected = [str(i) for i in range(len(index_to_name))]
    if set(index_to_name) != set(expected):
        raise ValueError(
            f"index_to_name.json keys must be 0..{len(index_to_name) - 1}, got {sorted(index_to_name)}; "
            "re-export the model with `python -m training.export`"
        )
    return [index_to_name[key] for key in expected]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N, C) float32 class probabilities."""
    return torch.softmax(logits.float(), dim=-1)


def top_k(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """One row of probabilities -> the k most likely classes, most likely first."""
    values, indices = probs.topk(min(k, len(classes)))
    return [
        {"label": classes[index], "index": index, "probability": value}
        for value, index in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def prediction_body(
    probs: torch.Tensor, classes: Sequence[str], k: int, model: str, version: str
) -> dict[str, Any]:
    """The 200 response for one request."""
    return {"model": model, "version": version, "predictions": top_k(probs, classes, k)}
