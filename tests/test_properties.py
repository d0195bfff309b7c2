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
import contextlib
import io
import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from ts.service import Service

from archive.selfcheck import Answer, WorkerRequest, predict
from handler.payload import decode_base64, parse_request, parse_top_k
from handler.postprocess import encode_prediction, prediction_body
from handler.preprocess import (
    DECODE_BUDGET_BYTES,
    InputError,
    PreprocessSpec,
    decode_cost,
    decode_image,
    normalize,
    preprocess,
    to_pixels,
)
from tests.conftest import load_handler, make_random_export

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


# The largest side each format can declare (GIF's sizes are 16-bit); PNG and BMP are capped at 200k.
MAX_SIDE = {"PNG": 200_000, "GIF": 65_535, "BMP": 200_000}


@st.composite
def oversized(draw: st.DrawFn) -> tuple[str, int, int]:
    """(format, width, height) with width x height over SPEC.max_pixels, each side within the format's
    range: drawn so, not filtered (most small draws would be under the limit)."""
    fmt = draw(st.sampled_from(sorted(MAX_SIDE)))
    side = MAX_SIDE[fmt]
    width = draw(st.integers(SPEC.max_pixels // side + 1, side))
    return fmt, width, draw(st.integers(SPEC.max_pixels // width + 1, side))


@PROPERTY
@given(declared=oversized())
def test_declared_size_over_the_pixel_limit_is_413_before_decoding(declared: tuple[str, int, int]) -> None:
    fmt, width, height = declared
    assert width * height > SPEC.max_pixels
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
    if fmt == "GIF":  # sizes are 16-bit: up to MAX_SIDE["GIF"]
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


# --- whole batches through TorchServe's worker code ------------------------------------------------
#
# The handler behind ts.service.Service (tests.conftest.load_handler), fed frames as the Java frontend
# sends them (archive.selfcheck), under both values of decode_input_request. The property: every
# request of a batch gets exactly one answer, 200 with predictions or a 4xx JSON error that the
# handler foresaw (never 5xx, never `unprocessable_input`), and each answer is the one the request
# gets when sent alone.

DEEP = 100_000


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # initialize() gives the process one torch thread, as in a worker; it keeps tiny batches fast on
    # a busy machine. The rest of the session gets its own setting back.
    saved = torch.get_num_threads()
    try:
        yield load_handler(make_random_export(tmp_path_factory.mktemp("export")))
    finally:
        torch.set_num_threads(saved)


def good_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def grpc(inputs: dict[str, bytes]) -> WorkerRequest:
    """A gRPC Predictions request: the `input` map as parameters without content type, no headers."""
    return WorkerRequest(tuple((name, "", value) for name, value in inputs.items()))


def file_part(content_type: str, value: bytes) -> WorkerRequest:
    return WorkerRequest.multipart({"data": (content_type, value), "topk": ("", b"3")})


JSON_TEXTS = st.one_of(
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 20_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 20_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.integers(4000, 6000).map(lambda digits: b'{"data": "AAAA", "topk": ' + b"9" * digits + b"}"),
    st.integers(1, 3000).map(lambda count: b'{"data": "AAAA", "x": [' + b"[]," * count + b"[]]}"),
    st.just(b"[" * DEEP),
)


@st.composite
def requests(draw: st.DrawFn) -> WorkerRequest:
    """Any request shape a client can produce over REST or gRPC, good or hostile."""
    image = draw(images())[3]
    text = draw(JSON_TEXTS)
    shapes = [
        WorkerRequest.raw(image, "image/png"),
        WorkerRequest.raw(draw(st.binary(max_size=512)), draw(st.sampled_from(["", "image/png", "text/x"]))),
        WorkerRequest.raw(text, "application/json"),
        WorkerRequest.raw(text, draw(st.sampled_from(["text/plain", "application/octet-stream", ""]))),
        WorkerRequest.json({"data": base64.b64encode(image).decode(), "topk": draw(JSON_VALUES)}),
        file_part(draw(st.sampled_from(["image/png", "text/plain", "application/json"])), image),
        file_part(draw(st.sampled_from(["application/json", "text/plain", "text/csv"])), text),
        WorkerRequest.multipart(
            {name: (ctype, json.dumps(value).encode()) for name, ctype, value in draw(FORM_FIELDS)}
        ),
        grpc({"data": image, "topk": draw(st.binary(max_size=4) | st.just(b"2"))}),
        grpc({draw(st.sampled_from(["data", "file", "image", "body", "other"])): text}),
    ]
    return draw(st.sampled_from(shapes))


FORM_FIELDS = st.lists(
    st.tuples(
        st.sampled_from(["data", "file", "image", "topk", "k", "x"]),
        st.sampled_from(["", "image/png", "text/plain", "application/json"]),
        JSON_VALUES,
    ),
    max_size=3,
)


@contextlib.contextmanager
def decode_input_request(value: str) -> Iterator[None]:
    """What config.properties' decode_input_request tells the worker (TS_DECODE_INPUT_REQUEST)."""
    saved = os.environ.get("TS_DECODE_INPUT_REQUEST")
    os.environ["TS_DECODE_INPUT_REQUEST"] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TS_DECODE_INPUT_REQUEST"]
        else:
            os.environ["TS_DECODE_INPUT_REQUEST"] = saved


def check_answer(answer: Answer) -> None:
    """200 with predictions, or a 4xx JSON error the handler foresaw."""
    assert answer.content_type == "application/json", answer
    body = answer.json()
    if answer.status == 200:
        assert body["predictions"], body
        return
    assert 400 <= answer.status < 500, answer
    assert set(body) == {"error", "detail"} and body["detail"], body
    assert body["error"] != "unprocessable_input", f"an input the handler did not foresee: {body}"


def same_answer(batched: Answer, alone: Answer) -> bool:
    """Equal, up to float noise of batched inference in the probabilities."""
    if (batched.status, batched.content_type) != (alone.status, alone.content_type):
        return False
    if batched.status != 200:
        return batched.body == alone.body
    ours, theirs = batched.json()["predictions"], alone.json()["predictions"]
    return [p["label"] for p in ours] == [p["label"] for p in theirs] and all(
        abs(a["probability"] - b["probability"]) < 1e-5 for a, b in zip(ours, theirs, strict=True)
    )


@settings(PROPERTY, max_examples=max(10, PROPERTY.max_examples // 3))
@given(batch=st.lists(requests(), min_size=1, max_size=6), decode=st.sampled_from(["true", "false"]))
def test_every_request_in_a_batch_gets_its_own_answer(
    service: Service, batch: list[WorkerRequest], decode: str
) -> None:
    good = WorkerRequest.raw(good_png(0), "image/png")
    with decode_input_request(decode):
        answers = predict(service, [*batch, good])
        assert len(answers) == len(batch) + 1
        for request, answer in zip(batch, answers, strict=False):
            check_answer(answer)
            assert same_answer(answer, predict(service, [request])[0]), (request, answer)
        assert same_answer(answers[-1], predict(service, [good])[0])


def every_mode_and_format() -> list[tuple[str, str, bytes]]:
    """(mode, format, file) for each of Pillow's modes in each format Pillow can save it to."""
    Image.init()
    files = []
    for mode in Image.MODES:
        image = Image.new(mode, (40, 30))
        for fmt in sorted(Image.SAVE):
            buf = io.BytesIO()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image.save(buf, format=fmt)
            except Exception:  # this format cannot store this mode
                continue
            files.append((mode, fmt, buf.getvalue()))
    return files


@pytest.mark.parametrize("decode", ["true", "false"])
def test_every_mode_in_every_writable_format_is_answered_alongside_a_good_image(
    service: Service, decode: str
) -> None:
    files = every_mode_and_format()
    assert len({mode for mode, _, _ in files}) >= len(Image.MODES) - 1  # no format stores La
    good = WorkerRequest.raw(good_png(1), "image/png")
    alone = predict(service, [good])[0]
    with decode_input_request(decode):
        for mode, fmt, data in files:
            answers = predict(service, [WorkerRequest.raw(data, "image/png"), good])
            check_answer(answers[0])
            # Formats Pillow reads back must classify a plain image of every mode it wrote.
            if fmt in ("PNG", "TIFF", "BMP", "WEBP", "JPEG", "GIF"):
                assert answers[0].status == 200, (mode, fmt, answers[0].body)
            assert same_answer(answers[1], alone), (mode, fmt)


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_in_memory_gives_a_model_input(mode: str) -> None:
    # Noise with every band in use (also an extreme float range), so no conversion sees only zeros.
    bands = len(Image.new(mode, (1, 1)).getbands())
    noise = [Image.effect_noise((40, 30), 120).convert("L") for _ in range(bands)]
    image = Image.merge(mode, noise) if bands > 1 else noise[0].convert(mode)
    if mode == "F":
        image = Image.fromarray(np.asarray(image, np.float32) * 1e30 - 1e30)
    check_model_input(preprocess(image, SPEC))


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "RGB", "LA"])
def test_decoding_budget_refuses_images_that_would_not_fit_with_413(mode: str) -> None:
    # The largest image of this mode inside the budget decodes; a larger one is refused from its header.
    per_pixel = decode_cost(mode, 1)
    side = int((DECODE_BUDGET_BYTES // per_pixel) ** 0.5)
    assert decode_cost(mode, side * side) <= DECODE_BUDGET_BYTES < decode_cost(mode, (side + 1) ** 2)
    fmt = "PNG" if mode in ("I;16", "RGBA", "RGB", "LA") else "TIFF"
    big = Image.new(mode, (side + 1, side + 1))
    buf = io.BytesIO()
    big.save(buf, format=fmt)
    with pytest.raises(InputError) as raised:
        decode_image(buf.getvalue(), SPEC)
    assert (raised.value.status, raised.value.error) == (413, "image_too_large")
    assert "budget" in raised.value.detail


@PROPERTY
@given(
    probs=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=12),
    names=st.lists(st.text(max_size=12), min_size=12, max_size=12, unique=True),
    k=st.integers(1, 20),
    version=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,11}", fullmatch=True),
)
def test_encoded_prediction_is_byte_for_byte_what_torchserve_would_write(
    probs: list[float], names: list[str], k: int, version: str
) -> None:
    # The handler hands TorchServe these bytes instead of the dict it used to encode with indent=2.
    body = prediction_body(torch.tensor(probs), names[: len(probs)], k, "fashion_mnist", version)
    assert encode_prediction(body) == json.dumps(body, indent=2).encode("utf-8")


@PROPERTY
@given(batch=st.lists(images(), min_size=1, max_size=6))
def test_a_batch_normalised_at_once_equals_each_image_preprocessed_alone(
    batch: list[tuple[str, str, np.ndarray, bytes]],
) -> None:
    # The handler normalises a batch's pixels in one call; the model must see exactly preprocess()'s values.
    together = normalize(torch.from_numpy(np.stack([to_pixels(data, SPEC) for *_, data in batch])), SPEC)
    assert torch.equal(together, torch.stack([preprocess(data, SPEC) for *_, data in batch]))
