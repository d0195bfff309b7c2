"""Image bodies for the tests and benchmarks: arrays encoded as files, and sets of request bodies.

    from serving.images import encode, fashion_test_pngs
    body = encode(np.zeros((28, 28), np.uint8))          # a black 28x28 PNG
    bodies = fashion_test_pngs(REPO / "data", 256)       # real test images, or DataError

The benchmarks, the soak and the tests build their request bodies here, so every one of them sends
images encoded the same way.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode(pixels: np.ndarray, format: str = "PNG", **save: object) -> bytes:
    """An (H, W) or (H, W, C) uint8 array as an image file (Pillow picks L, RGB or RGBA from the
    shape); `save` goes to Pillow's save (e.g. quality=90 for JPEG)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format=format, **save)
    return buf.getvalue()


def noise_pngs(count: int, size: int = 28, seed: int = 0) -> list[bytes]:
    """`count` PNGs of uniform grey-level noise (when no real data is needed)."""
    rng = np.random.default_rng(seed)
    return [encode(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(count)]


def fashion_test_pngs(data: Path, count: int) -> list[bytes]:
    """The first `count` images of the processed test split under `data` (`python -m training.data`),
    as PNG bodies. Raises training.data.DataError (or FileNotFoundError) when the split is missing."""
    from training.data import load_split  # torch-heavy: only for callers that need real images

    return [encode(image) for image in load_split(data, "test").images[:count].numpy()]
