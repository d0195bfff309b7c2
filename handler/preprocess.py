"""The one preprocessing path: image bytes or PIL image -> normalised model input.

Training, offline evaluation, export checks and the TorchServe handler all call
these functions, and the parameters (`PreprocessSpec`) travel inside the exported
`model_meta.json`, so the server sees exactly what the model was tested on.

This module ships inside the `.mar` (as `handler/preprocess.py`), so it depends
only on torch, numpy and Pillow.

    >>> spec = ModelMeta.load(Path("artifacts/model")).preprocess    # handler/meta.py
    >>> x = preprocess(open("shirt.png", "rb").read(), spec)   # (1, 28, 28) float32
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Fashion-MNIST training-set pixel statistics (x / 255). Export recomputes and
# records the real values; these are only the defaults for a fresh spec.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


class InputError(ValueError):
    """Bad client input. `status` is the HTTP code the server answers with."""

    status = 400

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail

    def to_json(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


class ImageTooLarge(InputError):
    """The image declares more pixels than the limit (decompression-bomb guard)."""

    status = 413


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn an image into model input. Stored in model_meta.json."""

    height: int = 28
    width: int = 28
    mean: float = FASHION_MNIST_MEAN
    std: float = FASHION_MNIST_STD
    # Fashion-MNIST is light garments on a black background, so transparent
    # pixels are composited onto black to look like the training data.
    background: int = 0
    # Pixel-count limit checked from the header, before any pixel is decoded.
    max_pixels: int = 40_000_000
    resample: str = "bilinear"

    @property
    def input_shape(self) -> list[int]:
        return [1, self.height, self.width]

    def to_meta(self) -> dict[str, Any]:
        meta = asdict(self)
        meta["input_shape"] = self.input_shape
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PreprocessSpec:
        """Build from a full model_meta.json dict or from its `preprocess` section."""
        section = meta.get("preprocess", meta)
        keys = {"height", "width", "mean", "std", "background", "max_pixels", "resample"}
        missing = {"height", "width", "mean", "std"} - section.keys()
        if missing:
            raise KeyError(
                f"model metadata lacks preprocess fields {sorted(missing)}; "
                "re-export the model with `python -m training.export`"
            )
        return cls(**{k: section[k] for k in keys if k in section})


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}

# Peak memory one image may take while it is decoded and turned into grayscale. The pod gives the
# serving container 1 GiB (deploy/base/deployment.yaml) for the JVM (384 MiB heap plus its own
# overhead) and one Python worker (torch and the model, about 300 MiB); what is left holds one image
# in flight per worker with room to spare. The pixel limit alone allows ~1 GB for a 40 M pixel image.
DECODE_BUDGET_BYTES = 192 * 1024 * 1024
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa", "P")


def decode_cost(mode: str, pixels: int) -> int:
    """Bytes the decode -> grayscale path holds at its peak for one image of `mode` and `pixels`.

    Pillow stores 1 byte per pixel for 1/L/P, 2 for 16-bit modes and 4 for everything else (RGB is
    padded to 4). The decoded image and an EXIF-rotated copy exist at once; then the conversion adds
    its own buffers: numpy copies for high bit depths (the raw buffer, a 4-byte working array and the
    8-bit result), or an RGBA copy, a background and the composite for transparent images.
    """
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    if mode.startswith("I;16"):
        convert = stored + 4 + 1
    elif mode in HIGH_DEPTH_MODES:
        convert = stored + 4 + 4 + 1
    elif mode in ALPHA_MODES:
        convert = 4 + 4 + 4 + 1
    else:
        convert = 1
    return pixels * (2 * stored + convert)


def decode_image(data: bytes, spec: PreprocessSpec) -> Image.Image:
    """Decode bytes into a loaded PIL image, refusing bombs before decoding pixels.

    Raises InputError (400) for anything that is not a readable image and ImageTooLarge (413) when
    the header declares more than `spec.max_pixels`, or an image whose decoding would need more than
    DECODE_BUDGET_BYTES of memory (`decode_cost`).
    """
    if not data:
        raise InputError("empty_body", "the request carried no image bytes")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires at a lower limit than ours; the
            # explicit checks below are the ones that decide.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > spec.max_pixels:
                raise ImageTooLarge(
                    "image_too_large",
                    f"{width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{spec.max_pixels}; downscale the image before sending it",
                )
            if width == 0 or height == 0:
                raise InputError("empty_image", f"the image has zero area ({width}x{height})")
            cost = decode_cost(img.mode, width * height)
            if cost > DECODE_BUDGET_BYTES:
                raise ImageTooLarge(
                    "image_too_large",
                    f"decoding this {width}x{height} {img.mode} image needs about {cost >> 20} MiB, over "
                    f"the {DECODE_BUDGET_BYTES >> 20} MiB per-image budget; downscale it or send it as "
                    "8-bit grayscale",
                )
            img.seek(0)  # animated formats: classify the first frame
            img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            "unsupported_image",
            "the body is not an image in a format Pillow can read "
            "(PNG, JPEG, BMP, GIF, WebP and TIFF are supported)",
        ) from exc
    except Exception as exc:
        # Pillow's plugins report truncated or corrupt files through many exception types
        # (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, ...).
        raise InputError("corrupt_image", f"the image could not be decoded: {exc}") from exc
    return img


def to_grayscale(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Convert any mode (16-bit, float, palette, alpha, CMYK, LAB, ...) to 8-bit L, EXIF-upright.

    Raises InputError for a mode Pillow cannot turn into grayscale.
    """
    # A malformed EXIF block must not cost the prediction: keep the stored orientation.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(img), mode="L")
    if img.mode == "LAB":
        return img.getchannel("L")  # CIE lightness is the grayscale of the image
    if img.mode == "La":
        img = img.convert("LA")  # premultiplied alpha converts only to LA
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (spec.background,) * 3 + (255,))
        img = Image.alpha_composite(bg, rgba)
    try:
        return img.convert("L")
    except ValueError as exc:
        raise InputError(
            "unsupported_color_mode",
            f"images in Pillow mode {img.mode} cannot be converted to grayscale; save it as RGB or grayscale",
        ) from exc


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer or float pixels -> uint8, scaled from the mode's range (or 0..255).

    Works in 4-byte arrays, in place: a float64 copy of a 40 M pixel image alone is 320 MB.
    """
    if img.mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.uint32)  # (v * 255 + 32767) // 65535 rounds 0..65535 to 0..255
        wide *= 255
        wide += 32767
        wide //= 65535
        return wide.astype(np.uint8)
    pixels = np.asarray(img).astype(np.float32)
    np.nan_to_num(pixels, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    if pixels.max(initial=0) > 255:
        pixels *= 255.0 / 65535.0
    pixels += 0.5
    np.clip(pixels, 0, 255, out=pixels)
    return pixels.astype(np.uint8)


def image_to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Grayscale, resize to the model's size: (H, W) uint8, as in the training data."""
    gray = to_grayscale(img, spec)
    if gray.size != (spec.width, spec.height):
        gray = gray.resize((spec.width, spec.height), _RESAMPLE[spec.resample])
    return np.asarray(gray, dtype=np.uint8)


def normalize(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 pixels (..., H, W) -> float32 (..., 1, H, W) normalised with the spec.

    Training feeds whole uint8 batches (N, H, W) through this same function.
    """
    x = pixels.to(torch.float32).div_(255.0).sub_(spec.mean).div_(spec.std)
    return x.unsqueeze(-3)


def to_pixels(image: bytes | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Bytes or PIL image -> (H, W) uint8 pixels: everything before `normalize`.

    The handler gathers a batch's pixels and normalises them with one `normalize` call: the same
    element-wise arithmetic, so the same values, for a fraction of the per-image tensor operations.
    """
    img = decode_image(image, spec) if isinstance(image, (bytes, bytearray)) else image
    return image_to_array(img, spec)


def preprocess(image: bytes | Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """Bytes or PIL image -> float32 tensor of shape (1, H, W)."""
    return normalize(torch.from_numpy(to_pixels(image, spec).copy()), spec)
