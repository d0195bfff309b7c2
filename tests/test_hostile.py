"""The hostile-input matrix against a real TorchServe with batching on (batch_size 8).

    python -m pytest tests/test_hostile.py -q

Every kind of input is sent in the same batch as seven good images, each on its own connection. For
each kind the test asserts: the documented status and error body; the good batch-mates answered
exactly as the export answers offline; the worker PIDs unchanged (no restart); exactly one response
per request (tests.reliability.exchange); the server healthy afterwards; and no traceback or error
line in the server log. docs/reliability.md lists the kinds with their status codes.

Then every kind, the refused ones twice, is sent interleaved with good images from 16 clients to a
server running each target's TorchServe config (tests.reliability.TARGET_CONFIGS: the local file in
both decode modes, the container's and the pod's), each made runnable on loopback.

The model is a random-weights export archived with the project's own archive step (no training).
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serving.client import Client
from serving.images import encode as png_bytes
from serving.tsconfig import parse_properties, render
from tests.conftest import BATCH_DELAY_MS, BATCH_SIZE, Served
from tests.reliability import (
    PREDICT_PATH,
    TARGET_CONFIGS,
    Reply,
    exchange_all,
    http_request,
    settle_log,
    trouble,
    worker_pids,
)

MAX_REQUEST_SIZE = int(parse_properties(render("local"))["max_request_size"])
# Distinct good images, so a mixed-up answer cannot go unnoticed.
GOOD = [
    png_bytes(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)) for seed in range(8)
]


# --- the hostile inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One request: its body and headers, and for a 200 the image bytes the model must classify."""

    body: bytes
    content_type: str | None = "application/octet-stream"
    headers: dict[str, str | bytes] = field(default_factory=dict)
    method: str = "POST"
    chunk_size: int | None = None
    image: bytes | None = None  # what the answer must match offline (200 kinds)

    def request(self, inference_key: str) -> bytes:
        headers: dict[str, str | bytes] = {"Authorization": f"Bearer {inference_key}"}
        if self.content_type is not None:
            headers["Content-Type"] = self.content_type
        return http_request(self.method, PREDICT_PATH, headers | self.headers, self.body, self.chunk_size)


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[], Hostile]
    status: int
    # The "error" of a handler answer ({"error", "detail"}), the "type" of a TorchServe frontend answer
    # ({"code", "type", "message"}), or None: 200 with predictions, or the frontend's empty 413.
    error: str | None
    # "frontend": refused by TorchServe's HTTP layer, so the request never joins a batch.
    stage: str = "handler"


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def garment(mode: str = "L", size: tuple[int, int] = (28, 28)) -> Image.Image:
    """A bright shape on black, converted to `mode`: a plausible Fashion-MNIST-like input."""
    gray = np.zeros(size[::-1], dtype=np.uint8)
    gray[size[1] // 5 : -size[1] // 6, size[0] // 4 : -size[0] // 4] = 200
    return Image.fromarray(gray, mode="L").convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A valid grayscale PNG header declaring width x height, followed by almost no pixel data."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n"
        + header
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def raw(body: bytes, **kwargs: Any) -> Callable[[], Hostile]:
    return lambda: Hostile(body, **kwargs)


def image_body(make_image: Callable[[], bytes], **kwargs: Any) -> Callable[[], Hostile]:
    """A body that is a valid image: the answer must be the offline answer for those bytes."""

    def make() -> Hostile:
        image = make_image()
        return Hostile(image, image=image, **kwargs)

    return make


def as_json(value: Any) -> Callable[[], Hostile]:
    return lambda: Hostile(json.dumps(value).encode(), content_type="application/json")


def multipart(
    parts: list[tuple[bytes, bytes]], image: bytes | None = None, file_type: bytes = b"image/png"
) -> Callable[[], Hostile]:
    """parts: (Content-Disposition parameters, content) pairs; file parts say filename=... themselves
    and are sent with Content-Type `file_type`."""
    boundary = b"hostile-boundary-7d3f"
    body = b"".join(
        b"--" + boundary + b"\r\nContent-Disposition: form-data; " + params + b"\r\n"
        + (b"Content-Type: " + file_type + b"\r\n" if b"filename=" in params else b"")
        + b"\r\n" + content + b"\r\n"
        for params, content in parts
    ) + b"--" + boundary + b"--\r\n"  # fmt: skip
    return lambda: Hostile(
        body, content_type="multipart/form-data; boundary=" + boundary.decode(), image=image
    )


def truncated_png() -> Hostile:
    whole = png_bytes(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))
    return Hostile(whole[: len(whole) // 2])


def png_with_bad_crc(chunk: bytes) -> Callable[[], Hostile]:
    def make() -> Hostile:
        image = bytearray(png_bytes(np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)))
        start = image.index(chunk) - 4
        (length,) = struct.unpack(">I", image[start : start + 4])
        image[start + 8 + length] ^= 0xFF  # first byte of the chunk's CRC
        # Pillow checks the CRC of header chunks, not of pixel data (IDAT): that image decodes intact.
        return Hostile(bytes(image), image=bytes(image) if chunk == b"IDAT" else None)

    return make


def truncated_jpeg() -> Hostile:
    whole = encode(garment("RGB", (64, 64)), "JPEG", quality=90)
    return Hostile(whole[: len(whole) * 2 // 3])


def huge_png() -> bytes:
    """A real 10,000 x 10,000 image (a gradient, so it compresses to a few hundred kB)."""
    rows = np.broadcast_to((np.arange(10_000) % 256).astype(np.uint8), (10_000, 10_000))
    return encode(Image.fromarray(np.ascontiguousarray(rows), mode="L"), "PNG", compress_level=1)


def animated_gif() -> bytes:
    frames = [garment("P"), Image.new("P", (28, 28), 255), Image.new("P", (28, 28), 0)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


def png_16bit() -> bytes:
    return encode(Image.fromarray(np.asarray(garment(), dtype=np.uint16) * 257), "PNG")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise for display
    return encode(garment("RGB", (28, 40)), "JPEG", exif=exif.tobytes())


def lab_tiff() -> bytes:
    lab = Image.merge("LAB", [garment(), Image.new("L", (28, 28), 128), Image.new("L", (28, 28), 128)])
    return encode(lab, "TIFF")


def oversized(chunk_size: int | None = None) -> Callable[[], Hostile]:
    return lambda: Hostile(b"\0" * (MAX_REQUEST_SIZE + 1), chunk_size=chunk_size)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


FILE_PART = b'name="data"; filename="shirt.png"'
KINDS = [
    Kind("empty-body", raw(b""), 400, "empty_body"),
    Kind("random-bytes", raw(np.random.default_rng(3).bytes(2048)), 400, "unsupported_image"),
    Kind("truncated-png", truncated_png, 400, "corrupt_image"),
    Kind("png-bad-header-crc", png_with_bad_crc(b"IHDR"), 400, "unsupported_image"),
    Kind("png-bad-pixel-data-crc", png_with_bad_crc(b"IDAT"), 200, None),
    Kind("truncated-jpeg", truncated_jpeg, 400, "corrupt_image"),
    Kind("zero-area-png", raw(declared_png(0, 28)), 400, "unsupported_image"),
    Kind("one-pixel-png", image_body(lambda: encode(Image.new("L", (1, 1), 180), "PNG")), 200, None),
    Kind("10000x10000-png", lambda: Hostile(huge_png()), 413, "image_too_large"),
    Kind("png-declaring-50000x50000", raw(declared_png(50_000, 50_000)), 413, "image_too_large"),
    Kind("animated-gif", image_body(animated_gif, content_type="image/gif"), 200, None),
    Kind("16-bit-png", image_body(png_16bit, content_type="image/png"), 200, None),
    Kind(
        "16-bit-png-over-decode-budget", raw(declared_png(5_000, 5_000, bit_depth=16)), 413, "image_too_large"
    ),
    Kind("lab-tiff", image_body(lab_tiff, content_type="image/tiff"), 200, None),
    Kind(
        "cmyk-jpeg", image_body(lambda: encode(garment("CMYK"), "JPEG"), content_type="image/jpeg"), 200, None
    ),
    Kind("rgba-png", image_body(lambda: encode(garment("RGBA"), "PNG"), content_type="image/png"), 200, None),
    Kind("exif-rotated-jpeg", image_body(exif_rotated_jpeg, content_type="image/jpeg"), 200, None),
    Kind("json-invalid-base64", as_json({"data": "not base64 at all!"}), 400, "invalid_base64"),
    Kind("json-without-data", as_json({"image": b64(GOOD[0])}), 400, "missing_data"),
    Kind("json-data-is-a-number", as_json({"data": 42}), 400, "invalid_data"),
    Kind("json-array", as_json([b64(GOOD[0])]), 400, "missing_data"),
    Kind("json-malformed", raw(b'{"data": "iVBOR', content_type="application/json"), 400, "invalid_json"),
    Kind("png-sent-as-json", raw(GOOD[0], content_type="application/json"), 400, "invalid_json"),
    Kind(
        "json-nested-100000-deep",
        raw(b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", content_type="application/json"),
        400,
        "json_too_complex",
    ),
    Kind(
        "json-5000-digit-top-k",
        raw(b'{"data": "AAAA", "topk": ' + b"7" * 5000 + b"}", content_type="application/json"),
        400,
        "json_too_complex",
    ),
    Kind("multipart-without-file", multipart([(b'name="topk"', b"3")]), 400, "missing_file"),
    Kind(
        "multipart-two-unnamed-files",
        multipart([(b'name="a"; filename="a.png"', GOOD[0]), (b'name="b"; filename="b.png"', GOOD[1])]),
        400,
        "ambiguous_file",
    ),
    Kind(
        "multipart-text-file-part",
        multipart([(FILE_PART, b"a plain-text note")], file_type=b"text/plain"),
        400,
        "unsupported_image",
    ),
    Kind(
        "multipart-json-file-part",
        multipart(
            [(FILE_PART, b'{"data": "' + b64(GOOD[0]).encode() + b'"}')], file_type=b"application/json"
        ),
        400,
        "unsupported_image",
    ),
    Kind(
        "multipart-json-number-file-part",
        multipart([(FILE_PART, b"1000000000")], file_type=b"application/json"),
        400,
        "unsupported_image",
    ),
    Kind(
        "multipart-non-utf8-filename",
        multipart([(b'name="data"; filename="\xff\xfe\xe9t\xe9.png"', GOOD[2])], image=GOOD[2]),
        200,
        None,
    ),
    Kind(
        "form-urlencoded",
        raw(GOOD[0], content_type="application/x-www-form-urlencoded"),
        400,
        "unsupported_content_type",
    ),
    Kind("binary-sent-as-text-plain", image_body(lambda: GOOD[3], content_type="text/plain"), 200, None),
    Kind("invalid-top-k", raw(GOOD[0], headers={"X-Top-K": "-1"}), 400, "invalid_top_k"),
    Kind("get-without-body", raw(b"", method="GET", content_type=None), 400, "empty_body"),
    Kind(
        "non-utf8-header-value", image_body(lambda: GOOD[4], headers={"X-Note": b"\xff\xfe\xe9"}), 200, None
    ),
    Kind("chunked-body", image_body(lambda: GOOD[5], chunk_size=100), 200, None),
    Kind("body-over-max-request-size", oversized(), 413, None, "frontend"),
    Kind("chunked-body-over-max-request-size", oversized(chunk_size=1 << 20), 413, None, "frontend"),
    Kind(
        "huge-header",
        raw(GOOD[0], headers={"X-Padding": "a" * 70_000}),
        400,
        "BadRequestException",
        "frontend",
    ),
]


# --- checks ---------------------------------------------------------------------------------------------


def inference_port(client: Client) -> int:
    return int(client.urls["inference"].rsplit(":", 1)[1])


def good_request(client: Client, image: bytes) -> bytes:
    headers = {"Authorization": f"Bearer {client.key('inference')}", "Content-Type": "image/png"}
    return http_request("POST", PREDICT_PATH, headers, image)


def answers_like_offline(reply: Reply, probabilities: torch.Tensor) -> bool:
    """A 200 whose top-5 are the export's five most likely classes, with the export's probabilities.

    Compared with a tolerance, because the server runs the frozen, inference-optimised model.
    """
    if reply.status != 200:
        return False
    predictions = reply.json()["predictions"]
    shown = [p["index"] for p in predictions]
    rest = [float(probabilities[i]) for i in range(len(probabilities)) if i not in shown]
    return (
        len(predictions) == 5
        and all(abs(p["probability"] - float(probabilities[p["index"]])) < 1e-4 for p in predictions)
        and [p["probability"] for p in predictions]
        == sorted((p["probability"] for p in predictions), reverse=True)
        and min(p["probability"] for p in predictions) >= max(rest) - 1e-4
    )


def check_answer(
    kind: Kind, hostile: Hostile, reply: Reply, offline: Callable[[bytes], torch.Tensor]
) -> None:
    """The documented status and body of `kind` (see docs/reliability.md)."""
    assert reply.status == kind.status, f"{kind.name}: {reply.status} {reply.body[:300]!r}"
    if kind.status == 200:
        assert hostile.image is not None and answers_like_offline(reply, offline(hostile.image)), reply.body
    elif kind.stage == "handler":
        assert reply.headers["content-type"] == "application/json"
        body = reply.json()
        assert set(body) == {"error", "detail"} and body["error"] == kind.error and body["detail"], body
    elif kind.error is None:  # netty refuses an oversized body before TorchServe's code sees it
        assert reply.body == b""
    else:
        body = reply.json()
        assert (body["code"], body["type"]) == (kind.status, kind.error) and body["message"], body


def check_healthy(client: Client, pids: dict[str, int], offline: Callable) -> None:
    """Same worker PIDs, /ping healthy, a full batch of good images answered right, no trouble logged."""
    assert worker_pids(client) == pids, "a worker was restarted"
    assert client.ping() == {"status": "Healthy"}
    requests = [good_request(client, image) for image in GOOD]
    replies = exchange_all(inference_port(client), requests, client.key("inference"), clients=BATCH_SIZE)
    assert [
        answers_like_offline(reply, offline(image)) for reply, image in zip(replies, GOOD, strict=True)
    ] == [True] * len(GOOD)


# --- tests ---------------------------------------------------------------------------------------------


@pytest.mark.serving
@pytest.mark.solo  # one shared batch is shown by answers in under half the 4 s batch delay
@pytest.mark.parametrize("kind", KINDS, ids=[kind.name for kind in KINDS])
def test_hostile_input_gets_its_answer_and_spares_its_batch(
    served: Served, offline: Callable[[bytes], torch.Tensor], kind: Kind
) -> None:
    client, log_file = served.client, served.instance.log_file
    log_start = len(settle_log(client, log_file, BATCH_SIZE))
    pids = worker_pids(client)
    hostile = kind.make()
    # A refused-by-the-frontend request never joins a batch, so eight good images fill it.
    goods = GOOD[: BATCH_SIZE - 1] if kind.stage == "handler" else GOOD[:BATCH_SIZE]
    requests = [good_request(client, image) for image in goods]
    requests.insert(3, hostile.request(client.key("inference")))

    start = time.monotonic()
    replies = exchange_all(inference_port(client), requests, client.key("inference"), clients=len(requests))
    elapsed = time.monotonic() - start

    assert elapsed < BATCH_DELAY_MS / 1000 / 2, f"{elapsed:.1f} s: the requests did not share one batch"
    check_answer(kind, hostile, replies.pop(3), offline)
    assert [
        answers_like_offline(reply, offline(image)) for reply, image in zip(replies, goods, strict=True)
    ] == [True] * len(goods)
    check_healthy(client, pids, offline)
    assert trouble(settle_log(client, log_file, BATCH_SIZE)[log_start:], served.worker_decodes) == []


@pytest.mark.serving
@pytest.mark.parametrize("served", list(TARGET_CONFIGS), indirect=True)
def test_every_kind_interleaved_with_good_requests_under_each_target_config(
    served: Served, offline: Callable[[bytes], torch.Tensor]
) -> None:
    client, log_file = served.client, served.instance.log_file
    log_start = len(settle_log(client, log_file, BATCH_SIZE))
    pids = worker_pids(client)
    # Every kind, the refused ones twice, each followed by a good image.
    kinds = KINDS + [kind for kind in KINDS if kind.status != 200]
    sequence: list[tuple[Kind | None, Hostile]] = []
    for i, kind in enumerate(kinds):
        image = GOOD[i % len(GOOD)]
        sequence += [(kind, kind.make()), (None, Hostile(image, content_type="image/png", image=image))]
    key = client.key("inference")

    replies = exchange_all(inference_port(client), [hostile.request(key) for _, hostile in sequence], key, 16)

    for (kind, hostile), reply in zip(sequence, replies, strict=True):
        if kind is None:
            assert answers_like_offline(reply, offline(hostile.image)), reply.body
        else:
            check_answer(kind, hostile, reply, offline)
    check_healthy(client, pids, offline)
    assert trouble(settle_log(client, log_file, BATCH_SIZE)[log_start:], served.worker_decodes) == []


def documented_kinds() -> dict[str, tuple[int, str | None]]:
    """Kind -> (status, error) from the hostile-input table of docs/reliability.md, whose test column
    must name the row's own kind."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text(encoding="utf-8")
    table = doc.split("| kind | what is sent | status | body | test |", 1)[1].split("\n\n", 1)[0]
    rows = table.strip().splitlines()[1:]  # below the |---| line
    kinds = {}
    for row in rows:
        match = re.fullmatch(r"\| `([^`]+)` \| .* \| (\d{3}) \| ([^|]*) \| `\[([^\]]+)\]` \|", row)
        assert match and match[1] == match[4], f"malformed row in docs/reliability.md: {row}"
        error = re.match(r"`([^`]+)`", match[3].strip())
        kinds[match[1]] = (int(match[2]), error[1] if error else None)
    return kinds


def test_the_documented_table_and_the_matrix_list_the_same_kinds() -> None:
    tested = {kind.name: (kind.status, kind.error) for kind in KINDS}
    documented = documented_kinds()
    assert len(tested) >= 20
    assert sorted(set(tested) - set(documented)) == [], "tested kinds missing from docs/reliability.md"
    assert sorted(set(documented) - set(tested)) == [], "documented kinds that no test sends"
    assert tested == documented
