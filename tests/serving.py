"""Helpers for the end-to-end serving tests (tests/test_serving_e2e.py): images as PNG bodies,
the offline answers the server must reproduce, and many concurrent REST calls.

The offline side is exactly what evaluation of an export does: torch.jit.load(model.pt) and the
shared handler.preprocess on the same PNG bytes the server receives.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

from handler.preprocess import PreprocessSpec, preprocess


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def offline_probabilities(export_dir: Path, bodies: Sequence[bytes], batch: int = 1000) -> torch.Tensor:
    """(N, C) class probabilities of the exported model for encoded images, evaluated in-process."""
    meta = json.loads((export_dir / "model_meta.json").read_text(encoding="utf-8"))
    spec = PreprocessSpec.from_meta(meta)
    model = torch.jit.load(str(export_dir / "model.pt"), map_location="cpu").eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(bodies), batch):
            x = torch.stack([preprocess(body, spec) for body in bodies[start : start + batch]])
            out.append(torch.softmax(model(x).float(), dim=-1))
    return torch.cat(out)


def post_concurrently(
    url: str, bodies: Sequence[bytes], headers: dict[str, str], clients: int = 16
) -> list[tuple[int, Any]]:
    """POST every body from `clients` threads, each over its own keep-alive connection.

    Returns (status, parsed JSON or None) in the order of `bodies`. http.client rather than
    requests: on a 2-core machine the client shares the CPU with the server, and requests costs
    several times more CPU per call.
    """
    parts = urlsplit(url)
    local = threading.local()
    connections: list[http.client.HTTPConnection] = []

    def post(body: bytes) -> tuple[int, Any]:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            connections.append(local.conn)
        # A closed connection (TorchServe closes after some errors) reopens on the next request.
        local.conn.request("POST", parts.path, body=body, headers=headers)
        resp = local.conn.getresponse()
        payload = resp.read()
        try:
            return resp.status, json.loads(payload)
        except ValueError:
            return resp.status, None

    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            return list(pool.map(post, bodies))
    finally:
        for conn in connections:
            conn.close()
