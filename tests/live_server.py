"""Helpers for the tests that run a real TorchServe: a server for a test module, the offline answers
the server must reproduce, and the headers of a raw prediction request.

The offline side is exactly what evaluation of a model directory (an export, or an unpacked archive)
does: the handler's own loader (handler/variants.py, as the metadata's variant says) and the shared
handler.preprocess on the same PNG bytes the server receives.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from handler.preprocess import PreprocessSpec, preprocess
from handler.variants import EXPORTED_VARIANT, load_model
from serving import MODEL_NAME
from serving.client import Client
from serving.server import ANY_PORTS, Instance, start, stop


@contextlib.contextmanager
def running_server(store: Path, state_root: Path, name: str) -> Iterator[Instance]:
    """A server on free ports with `store` as its model store, stopped however the block ends."""
    instance = Instance(name, state_root)
    start(instance, store, ANY_PORTS)
    try:
        yield instance
    finally:
        stop(instance)


def predictions_url(client: Client) -> str:
    return f"{client.urls['inference']}/predictions/{MODEL_NAME}"


def inference_headers(client: Client, top_k: int = 5) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {client.key('inference')}",
        "Content-Type": "application/octet-stream",
        "X-Top-K": str(top_k),
    }


def offline_probabilities(model_dir: Path, bodies: Sequence[bytes], batch: int = 1000) -> torch.Tensor:
    """(N, C) class probabilities of the model in `model_dir` for encoded images, evaluated in-process."""
    meta = json.loads((model_dir / "model_meta.json").read_text(encoding="utf-8"))
    spec = PreprocessSpec.from_meta(meta)
    model = load_model(model_dir / "model.pt", meta.get("variant", EXPORTED_VARIANT))
    out = []
    with torch.inference_mode():
        for first in range(0, len(bodies), batch):
            x = torch.stack([preprocess(body, spec) for body in bodies[first : first + batch]])
            out.append(torch.softmax(model(x).float(), dim=-1))
    return torch.cat(out)
