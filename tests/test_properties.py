"""Property tests of the pure request path: whatever a client sends, the decode, preprocess and payload
functions either return a correct model input or raise the project's InputError, and nothing else.

    python -m pytest tests/test_properties.py -q

Hypothesis generates arbitrary bytes, arbitrary valid images in every supported format and colour
mode, valid images with flipped bytes or cut short, and arbitrary JSON, multipart and header values.
Example counts are kept small so the module runs in seconds; raise them locally with
HYPOTHESIS_MAX_EXAMPLES=2000 when hunting.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from handler.payload import decode_base64, parse_request, parse_top_k
from handler.preprocess import InputError, PreprocessSpec, decode_image, normalize, preprocess

SPEC = PreprocessSpec()
NUM_CLASSES = 10
# The normalised value of a black and of a white pixel: every model input lies between them.
LOW, HIGH = (0 - SPEC.mean) / SPEC.std, (1 - SPEC.mean) / SPEC.std

# No deadline: the first decode of each format imports a Pillow plugin, which a per-example deadline
# would report as flaky. Images are generated large enough to hit resizing, so health checks that
# flag slow generation are off.
PROPERTY = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# format -> (colour modes Pillow writes in it, lossless for 8-bit grayscale?)
FORMATS = {
    "PNG": (["1", "L", "LA", "P", "RGB", "RGBA", "I;16"], True),
    "JPEG": (["L", "RGB", "CMYK"], False),
    "BMP": (["1", "L", "P", "RGB"], True),
    "GIF": (["L", "P"], True),
    "WEBP": (["RGB", "RGBA"], False),
    "TIFF": (["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16"], True),
}
CHANNELS = {"1": 1, "L": 1, "P": 1, "I;16": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}


def check_model_input(x: torch.Tensor) -> None:
    """What the model needs: (1, H, W) float32, finite, inside the range of normalised pixels."""
    assert x.shape == (1, SPEC.height, SPEC.width) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert float(x.min()) >= LOW - 1e-5 and float(x.max()) <= HIGH + 1e-5


def preprocess_or_input_error(data: bytes) -> torch.Tensor | None:
    """preprocess(data), or None when it raised InputError; any other exception fails the test."""
    try:
        x = preprocess(data, SPEC)
    except InputError as err:
        assert err.status in (400, 413) and err.error and err.detail
        assert json.loads(json.dumps(err.to_json())) == {"error": err.error, "detail": err.detail}
        return None
    check_model_input(x)
    return x


@st.composite
def images(draw: st.DrawFn, fmt: str | None = None) -> tuple[str, str, np.ndarray, bytes]:
    """(format, mode, pixels, encoded file) for a random image any supported format can hold."""
    fmt = fmt or draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt][0]))
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    shape = (height, width) if CHANNELS[mode] == 1 else (height, width, CHANNELS[mode])
    top = 65535 if mode == "I;16" else 255
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(
        0, top + 1, shape, dtype=np.uint16 if top > 255 else np.uint8
    )
    if mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16))
    elif mode in ("1", "P"):
        image = Image.fromarray(pixels.astype(np.uint8), mode="L").convert(mode)
    else:
        image = Image.fromarray(pixels, mode=mode if mode != "L" else None)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return fmt, mode, pixels, buf.getvalue()


# --- decode and preprocess -------------------------------------------------------------------------


@PROPERTY
@given(data=st.binary(max_size=4096))
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
@example(data=b"GIF89a\x00\x00\x00\x00")  # a GIF that declares zero area
def test_arbitrary_bytes_give_a_model_input_or_an_input_error(data: bytes) -> None:
    preprocess_or_input_error(data)


@PROPERTY
@given(image=images())
def test_every_valid_image_gives_a_model_input(image: tuple[str, str, np.ndarray, bytes]) -> None:
    _, _, _, encoded = image
    check_model_input(preprocess(encoded, SPEC))


@PROPERTY
@given(image=images(), fmt=st.sampled_from([f for f, (modes, lossless) in FORMATS.items() if lossless]))
def test_lossless_grayscale_at_model_size_is_normalised_pixel_for_pixel(
    image: tuple[str, str, np.ndarray, bytes], fmt: str
) -> None:
    # Redraw at the model's size in 8-bit grayscale: the tensor must be exactly the pixels, normalised
    # as training normalises them.
    pixels = np.frombuffer(
        image[3][: SPEC.height * SPEC.width].ljust(SPEC.height * SPEC.width, b"\0"), np.uint8
    )
    pixels = pixels.reshape(SPEC.height, SPEC.width)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format=fmt)
    expected = normalize(torch.from_numpy(pixels.copy()), SPEC)
    assert torch.equal(preprocess(buf.getvalue(), SPEC), expected)


@PROPERTY
@given(
    image=images(),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=8),
)
def test_valid_images_with_flipped_bytes_give_a_model_input_or_an_input_error(
    image: tuple[str, str, np.ndarray, bytes], flips: list[tuple[int, int]]
) -> None:
    corrupt = bytearray(image[3])
    for position, mask in flips:
        corrupt[position % len(corrupt)] ^= mask
    preprocess_or_input_error(bytes(corrupt))


@PROPERTY
@given(image=images(), keep=st.floats(0.0, 1.0, exclude_max=True))
def test_valid_images_cut_short_give_a_model_input_or_an_input_error(
    image: tuple[str, str, np.ndarray, bytes], keep: float
) -> None:
    encoded = image[3]
    preprocess_or_input_error(encoded[: int(len(encoded) * keep)])


@PROPERTY
@given(
    width=st.integers(1, 200_000), height=st.integers(1, 200_000), fmt=st.sampled_from(["PNG", "GIF", "BMP"])
)
def test_declared_size_over_the_pixel_limit_is_413_before_decoding(width: int, height: int, fmt: str) -> None:
    assume(width * height > SPEC.max_pixels)
    with pytest.raises(InputError) as raised:
        decode_image(header_only(fmt, width, height), SPEC)
    assert raised.value.status == 413 and raised.value.error == "image_too_large"


def header_only(fmt: str, width: int, height: int) -> bytes:
    """A file that declares width x height but carries (almost) no pixel data: a decompression bomb."""
    if fmt == "PNG":

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b"")
        )
    if fmt == "GIF":  # 16-bit sizes: scale down to what the format can declare
        width, height = min(width, 65535), min(height, 65535)
        assume(width * height > SPEC.max_pixels)
        screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
        return (
            b"GIF89a"
            + screen
            + b"\x2c"
            + struct.pack("<HHHHB", 0, 0, width, height, 0)
            + b"\x02\x02\x44\x01\x00\x3b"
        )
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


# --- payload: what a client sends -> image bytes and k ---------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/octet-stream",
        "image/png",
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "nonsense",
    ]
)


def parse_and_preprocess(row: dict, headers: dict) -> None:
    """The handler's per-request path: parse_request, then preprocess; InputError or a model input."""
    try:
        request = parse_request(row, headers, NUM_CLASSES)
    except InputError as err:
        assert err.status == 400 and err.error and err.detail
        return
    assert isinstance(request.image, bytes)
    assert 1 <= request.top_k <= NUM_CLASSES
    preprocess_or_input_error(request.image)


@PROPERTY
@given(
    body=st.binary(max_size=512) | st.text(max_size=128),
    content_type=CONTENT_TYPES,
    top_k=st.none() | st.text(max_size=6),
)
def test_any_raw_body_gives_a_request_or_an_input_error(
    body: bytes | str, content_type: str | None, top_k: str | None
) -> None:
    headers: dict = {} if content_type is None else {"Content-Type": content_type}
    if content_type is not None and content_type.startswith("application/json"):
        headers["body"] = {"content-type": "application/json"}
    if top_k is not None:
        headers["X-Top-K"] = top_k
    parse_and_preprocess({"body": body}, headers)


@PROPERTY
@given(value=JSON_VALUES)
def test_any_json_value_gives_a_request_or_an_input_error(value: object) -> None:
    # With decode_input_request on, TorchServe hands the handler the parsed value; with it off, the bytes.
    headers = {"Content-Type": "application/json", "body": {"content-type": "application/json"}}
    parse_and_preprocess({"body": value}, headers)
    parse_and_preprocess({"body": json.dumps(value).encode()}, headers)


@PROPERTY
@given(image=images(), topk=JSON_VALUES, url_safe=st.booleans(), padded=st.booleans())
def test_base64_json_of_a_valid_image_gives_its_model_input(
    image: tuple[str, str, np.ndarray, bytes], topk: object, url_safe: bool, padded: bool
) -> None:
    encoded = image[3]
    text = (base64.urlsafe_b64encode if url_safe else base64.b64encode)(encoded).decode()
    body = {"data": text if padded else text.rstrip("=")}
    if topk is not None:
        body["topk"] = topk
    headers = {"Content-Type": "application/json", "body": {"content-type": "application/json"}}
    try:
        request = parse_request({"body": body}, headers, NUM_CLASSES)
    except InputError as err:
        assert err.error == "invalid_top_k"  # the only thing wrong with this body can be its k
        return
    assert request.image == encoded
    check_model_input(preprocess(request.image, SPEC))


@PROPERTY
@given(
    fields=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.tuples(st.binary(max_size=256), st.sampled_from(["", "image/png", "application/octet-stream"])),
        max_size=4,
    )
)
def test_any_multipart_form_gives_a_request_or_an_input_error(fields: dict[str, tuple[bytes, str]]) -> None:
    row = {name: value for name, (value, _) in fields.items()}
    headers: dict = {"Content-Type": "multipart/form-data; boundary=x"}
    headers |= {name: {"content-type": ctype} for name, (_, ctype) in fields.items()}
    parse_and_preprocess(row, headers)


@PROPERTY
@given(text=st.text(max_size=200))
@example(text="data:image/png;base64,iVBORw0KGgo=")
def test_any_base64_text_decodes_or_is_an_input_error(text: str) -> None:
    try:
        decoded = decode_base64(text)
    except InputError as err:
        assert err.error == "invalid_base64"
        return
    assert isinstance(decoded, bytes)


@PROPERTY
@given(value=JSON_VALUES | st.binary(max_size=8))
def test_any_top_k_is_clamped_into_range_or_is_an_input_error(value: object) -> None:
    try:
        k = parse_top_k(value, NUM_CLASSES)
    except InputError as err:
        assert err.error == "invalid_top_k"
        return
    assert isinstance(k, int) and 1 <= k <= NUM_CLASSES
