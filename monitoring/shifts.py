"""The fixed set of input shifts the model's robustness and the drift monitor are measured under.

A library module (no command line); `python -m monitoring.robustness` runs every shift:

    >>> from monitoring.shifts import SHIFTS
    >>> shift = SHIFTS["rotation"]
    >>> shift.levels                                     # (0, 10, 20, 30, 45, 60) degrees; 0 = clean
    >>> images, labels = shift.apply(test_images, test_labels, 30, np.random.default_rng(0))

Every shift maps a batch of uint8 images (N, 28, 28) to another such batch, as a client would
send them: the server only ever sees 8-bit pixels, so each result is clipped and rounded. The
first level of every shift is the identity, so severity 0 is the clean test set. Labels pass
through unchanged, except for the different-source shift: its images are not garments at all,
so they carry the label NO_LABEL and no answer to them counts as correct.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

NO_LABEL = -1
Transform = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Shift:
    """A named transform and its severity levels (`levels[0]` leaves the images unchanged)."""

    name: str
    unit: str  # what a level means, for tables and plot labels
    levels: tuple[float, ...]
    transform: Transform
    foreign: bool = False  # the level is the share of images replaced by another source

    def apply(
        self, images: np.ndarray, labels: np.ndarray, level: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) uint8 images and (N,) labels -> the shifted batch and its labels."""
        if self.foreign:
            # The replaced images are the first `count`: callers shuffle the stream themselves.
            count = round(level * len(images))
            images, labels = images.copy(), labels.copy()
            images[:count] = self.transform(images[:count], level, rng)
            labels[:count] = NO_LABEL
            return images, labels
        shifted = self.transform(images.astype(np.float64), level, rng)
        return np.clip(np.rint(shifted), 0, 255).astype(np.uint8), labels


def _per_image(images: np.ndarray, op: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(op(Image.fromarray(i.astype(np.uint8))), dtype=np.float64) for i in images])


def brightness(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Add `level` to every pixel (0-255 scale): a brighter exposure or a grey background."""
    return x + level


def exposure(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Multiply every pixel by `level` (1 = unchanged): a dim, under-exposed shot."""
    return x * level


def contrast(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Scale each image's deviation from its own mean by `level` (1 = unchanged): a washed-out shot."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * level + mean


def gaussian_noise(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Independent Gaussian noise with standard deviation `level` (0-255 scale): sensor noise."""
    return x + rng.normal(0.0, level, x.shape) if level else x


def blur(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of radius `level` pixels: an out-of-focus camera."""
    return _per_image(x, lambda im: im.filter(ImageFilter.GaussianBlur(level))) if level else x


def rotation(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate by `level` degrees, each image clockwise or anticlockwise at random."""
    signs = rng.choice((-1.0, 1.0), len(x))
    return np.stack(
        [
            np.asarray(
                Image.fromarray(i.astype(np.uint8)).rotate(s * level, Image.Resampling.BILINEAR),
                dtype=np.float64,
            )
            for i, s in zip(x, signs, strict=True)
        ]
    )


def translation(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Move each image `level` pixels in a random direction, filling with the black background."""
    angles = rng.uniform(0.0, 2 * np.pi, len(x))
    out = []
    for image, angle in zip(x, angles, strict=True):
        dx, dy = round(level * np.cos(angle)), round(level * np.sin(angle))
        moved = Image.fromarray(image.astype(np.uint8)).rotate(0, translate=(dx, dy))
        out.append(np.asarray(moved, dtype=np.float64))
    return np.stack(out)


def inversion(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Blend towards the negative: (1 - level) * x + level * (255 - x); 1 is a dark garment on white."""
    return (1.0 - level) * x + level * (255.0 - x)


def jpeg(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG encode and decode at quality `level` (100 = unchanged here: the clean level)."""
    if level >= 100:
        return x

    def roundtrip(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=int(level))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("L")

    return _per_image(x, roundtrip)


def synthetic_digits(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Replace the images with rendered digits 0-9, white on black like MNIST.

    MNIST itself is not installable offline here (no Debian package), so this is a clearly
    synthetic stand-in for "a different source": digits drawn with Pillow's built-in font at
    random sizes, offsets, slants and stroke widths.
    """
    out = np.empty(x.shape, dtype=np.uint8)
    height, width = x.shape[1:]
    for k, digit in enumerate(rng.integers(0, 10, len(x))):
        canvas = Image.new("L", (width, height))
        font = ImageFont.load_default(size=int(rng.integers(18, 26)))
        centre = (width / 2 + rng.uniform(-2, 2), height / 2 + rng.uniform(-2, 2))
        stroke = int(rng.integers(0, 2))
        ImageDraw.Draw(canvas).text(
            centre, str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
        )
        out[k] = np.asarray(canvas.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR))
    return out


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("brightness", "added to every pixel (0-255)", (0, 25, 50, 75, 100, 150), brightness),
        Shift("exposure", "pixel factor", (1.0, 0.8, 0.6, 0.5, 0.4, 0.25), exposure),
        Shift("contrast", "contrast factor", (1.0, 0.8, 0.6, 0.4, 0.25, 0.1), contrast),
        Shift("gaussian_noise", "noise sigma (0-255)", (0, 10, 20, 40, 60, 90), gaussian_noise),
        Shift("blur", "Gaussian blur radius (px)", (0, 0.5, 1.0, 1.5, 2.0, 3.0), blur),
        Shift("rotation", "degrees", (0, 10, 20, 30, 45, 60), rotation),
        Shift("translation", "pixels", (0, 2, 4, 6, 8, 10), translation),
        Shift("inversion", "blend towards the negative", (0, 0.2, 0.4, 0.6, 0.8, 1.0), inversion),
        Shift("jpeg", "JPEG quality", (100, 75, 50, 25, 10, 5), jpeg),
        Shift(
            "synthetic_digits",
            "share of requests that are synthetic digits (MNIST stand-in)",
            (0, 0.1, 0.25, 0.5, 0.75, 1.0),
            synthetic_digits,
            foreign=True,
        ),
    )
}
