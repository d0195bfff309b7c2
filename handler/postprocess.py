"""Model output -> the JSON body each client gets back. Pure functions, no server needed:

>>> classes = class_names(json.load(open("artifacts/model/index_to_name.json")))
>>> probs = probabilities(model(batch))          # (N, C), each row sums to 1
>>> prediction_body(probs[0], classes, 2, "fashion_mnist", "1.0")
{'model': 'fashion_mnist', 'version': '1.0',
 'predictions': [{'label': 'Bag', 'index': 8, 'probability': 0.93}, {'label': ..., ...}]}
>>> encode_prediction(_)             # that body as the bytes the client gets
b'{\\n  "model": "fashion_mnist",\\n  "version": "1.0",\\n  "predictions": [...'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii
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
    """One row of probabilities -> the k most likely classes, most likely first; equal probabilities
    in class order, so the first is always what argmax (offline evaluation) picks. topk orders ties
    as its kernel happens to, which answered another class than argmax for tied int8 logits."""
    values, indices = probs.sort(descending=True, stable=True)
    values, indices = values[: min(k, len(classes))], indices[: min(k, len(classes))]
    return [
        {"label": classes[index], "index": index, "probability": value}
        for value, index in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def prediction_body(
    probs: torch.Tensor, classes: Sequence[str], k: int, model: str, version: str
) -> dict[str, Any]:
    """The 200 response for one request."""
    return {"model": model, "version": version, "predictions": top_k(probs, classes, k)}


def encode_prediction(body: Mapping[str, Any]) -> bytes:
    """A `prediction_body` as the exact bytes TorchServe sends for it, `json.dumps(body, indent=2)`.

    TorchServe encodes a handler's dict answers with indent=2, which makes json use its pure-Python
    encoder: the profile (docs/profiling.md) found that costing more than the postprocessing itself.
    The body has a fixed shape, so it is written here with json's C string escaper and Python's float
    repr (what json itself uses): byte for byte what TorchServe would have written, at a fraction of
    the cost. The handler returns these bytes, which TorchServe sends as they are.
    """
    rows = ",\n".join(
        f'    {{\n      "label": {encode_basestring_ascii(p["label"])},\n      "index": {p["index"]},\n'
        f'      "probability": {_number(p["probability"])}\n    }}'
        for p in body["predictions"]
    )
    model, version = (encode_basestring_ascii(body[key]) for key in ("model", "version"))
    predictions = f"[\n{rows}\n  ]" if rows else "[]"
    return f'{{\n  "model": {model},\n  "version": {version},\n  "predictions": {predictions}\n}}'.encode()


def _number(value: float) -> str:
    # json writes NaN and the infinities as these words; every other float as its repr.
    return repr(value) if math.isfinite(value) else json.dumps(value)
