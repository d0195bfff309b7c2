"""The TorchServe handler, driven through TorchServe's own worker code in-process (no JVM).

Requests are built the way the Java frontend forwards them (archive.selfcheck.WorkerRequest),
decoded by ts.protocol.otf_message_handler and answered through ts.service.Service.predict, so the
JSON decoding, per-request status codes and batching are TorchServe's own. The model is a
random-weights export (`make_random_export`), so these tests need no training.

    python -m pytest tests/test_handler.py -q
"""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ts.service import Service

from archive.selfcheck import Answer, WorkerRequest, predict
from handler import fashion_handler
from handler.fashion_handler import THREADS_ENV, configure_threads
from handler.meta import MetaError
from handler.postprocess import class_names, top_k
from handler.preprocess import PreprocessSpec, preprocess
from tests.conftest import load_handler, make_random_export
from training.data import CLASSES


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """initialize() sets the process's torch thread count; give the rest of the test session its own back."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def random_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def service(random_export: Path) -> Service:
    saved = torch.get_num_threads()
    service = load_handler(random_export)
    torch.set_num_threads(saved)
    return service


@pytest.fixture(scope="module")
def reference(random_export: Path) -> Callable[[bytes | Image.Image], list[float]]:
    """Class probabilities from the exported model (not frozen) run on preprocess() of an image."""
    model = torch.jit.load(str(random_export / "model.pt")).eval()
    spec = PreprocessSpec.from_meta(json.loads((random_export / "model_meta.json").read_text()))

    def probabilities(image: bytes | Image.Image) -> list[float]:
        with torch.inference_mode():
            return torch.softmax(model(preprocess(image, spec).unsqueeze(0)), dim=-1)[0].tolist()

    return probabilities


def ask(service: Service, *requests: WorkerRequest) -> list[Answer]:
    return predict(service, list(requests))


def picture(mode: str = "L", size: tuple[int, int] = (28, 28), seed: int = 0) -> Image.Image:
    """Deterministic noise in any mode; asymmetric, so rotations change what the model sees."""
    width, height = size
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    rgb = np.stack([gray, np.flipud(gray), np.fliplr(gray)], axis=-1)
    alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257)
    if mode in ("L", "LA"):
        return Image.fromarray(gray).convert(mode)
    if mode == "RGBA":
        return Image.fromarray(np.concatenate([rgb, alpha], axis=-1))
    return Image.fromarray(rgb).convert(mode)  # RGB, P, CMYK


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(seed: int = 0) -> bytes:
    return encode(picture(seed=seed), "PNG")


def animated_gif() -> bytes:
    frames = [picture("P", seed=seed) for seed in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixel data: a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_predicts(answer: Answer, expected: list[float], k: int = 5) -> None:
    """A 200 JSON answer whose top-k are the k most likely classes of `expected`, in order."""
    assert (answer.status, answer.content_type) == (200, "application/json"), answer.body
    body = answer.json()
    assert (body["model"], body["version"]) == ("fashion_mnist", "1.0")
    top = sorted(range(len(expected)), key=expected.__getitem__, reverse=True)[:k]
    assert [p["index"] for p in body["predictions"]] == top
    assert [p["label"] for p in body["predictions"]] == [CLASSES[i] for i in top]
    assert [p["probability"] for p in body["predictions"]] == pytest.approx(
        [expected[i] for i in top], abs=1e-5
    )


def test_png_answer_equals_model_on_preprocessed_image(service, reference):
    image = png()
    [answer] = ask(service, WorkerRequest.raw(image, "image/png"))
    assert_predicts(answer, reference(image))


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [
        ("PNG", "L", (28, 28)),
        ("PNG", "RGB", (300, 200)),
        ("PNG", "RGBA", (64, 64)),
        ("PNG", "P", (28, 28)),
        ("PNG", "LA", (28, 28)),
        ("PNG", "I;16", (40, 30)),
        ("PNG", "L", (1, 1)),
        ("JPEG", "L", (28, 28)),
        ("JPEG", "RGB", (1200, 900)),
        ("JPEG", "CMYK", (50, 50)),
        ("BMP", "RGB", (28, 28)),
        ("BMP", "P", (33, 17)),
        ("GIF", "P", (28, 28)),
        ("WEBP", "RGB", (100, 80)),
        ("WEBP", "RGBA", (28, 28)),
        ("TIFF", "L", (28, 28)),
        ("TIFF", "RGB", (28, 56)),
        ("TIFF", "I;16", (28, 28)),
    ],
    ids=lambda value: "x".join(map(str, value)) if isinstance(value, tuple) else str(value),
)
def test_image_formats_modes_and_sizes_are_classified(service, reference, fmt, mode, size):
    image = encode(picture(mode, size), fmt)
    [answer] = ask(service, WorkerRequest.raw(image, "application/octet-stream"))
    assert_predicts(answer, reference(image))


def test_animated_gif_is_classified_by_its_first_frame(service, reference):
    [answer] = ask(service, WorkerRequest.raw(animated_gif(), "image/gif"))
    assert_predicts(answer, reference(encode(picture("P", seed=0), "PNG")))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize(
    ("orientation", "upright"),
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_orientation_is_honoured(service, reference, fmt, orientation, upright):
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(picture("L", (28, 40)), fmt, exif=exif)
    [answer] = ask(service, WorkerRequest.raw(tagged, "image/" + fmt.lower()))
    # fromarray drops the EXIF block, so the references are exactly the stored and the displayed pixels
    stored = Image.fromarray(np.asarray(Image.open(io.BytesIO(tagged))))
    assert_predicts(answer, reference(stored.transpose(upright)))
    assert reference(stored.transpose(upright)) != pytest.approx(reference(stored), abs=1e-5)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PAYLOADS = {
    "raw-image/png": lambda: WorkerRequest.raw(png(), "image/png"),
    "raw-octet-stream": lambda: WorkerRequest.raw(png(), "application/octet-stream"),
    "raw-no-content-type": lambda: WorkerRequest.raw(png()),
    "multipart-data-field": lambda: WorkerRequest.multipart({"data": ("image/png", png())}),
    "multipart-any-file-field": lambda: WorkerRequest.multipart(
        {"upload": ("application/octet-stream", png())}
    ),
    "multipart-file-and-text-fields": lambda: WorkerRequest.multipart(
        {"note": ("", b"hello"), "image": ("image/png", png())}
    ),
    "multipart-named-among-files": lambda: WorkerRequest.multipart(
        {"thumb": ("image/png", png(seed=5)), "data": ("image/png", png())}
    ),
    "json-decoded-by-torchserve": lambda: WorkerRequest.json({"data": _b64(png())}),
    "json-as-text-plain": lambda: WorkerRequest.raw(json.dumps({"data": _b64(png())}).encode(), "text/plain"),
    "json-without-content-type": lambda: WorkerRequest.raw(json.dumps({"data": _b64(png())}).encode()),
    "json-base64-data-url": lambda: WorkerRequest.json({"data": "data:image/png;base64," + _b64(png())}),
    "json-base64-urlsafe-unpadded": lambda: WorkerRequest.json(
        {"data": base64.urlsafe_b64encode(png()).decode().rstrip("=")}
    ),
    "json-base64-with-line-breaks": lambda: WorkerRequest.json({"data": base64.encodebytes(png()).decode()}),
}


@pytest.fixture(params=["true", "false"], ids=["ts-decodes-json", "decode_input_request=false"])
def decode_input(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both worker modes: decode_input_request=false in config.properties reaches the worker as this
    variable, and JSON and text bodies then arrive as bytes instead of decoded values."""
    monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", request.param)


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_payload_formats_carry_the_image(service, reference, decode_input, payload):
    [answer] = ask(service, PAYLOADS[payload]())
    assert_predicts(answer, reference(png()))


BAD_PAYLOADS = {
    "empty-body": (WorkerRequest.raw(b"", "image/png"), "empty_body"),
    "not-an-image": (WorkerRequest.raw(b"hello, world", "application/octet-stream"), "unsupported_image"),
    "truncated-png": (WorkerRequest.raw(png()[:60], "image/png"), "corrupt_image"),
    # The frontend splits such a body into form fields; a PNG yields none (observed on a real server).
    "urlencoded-body": (
        WorkerRequest((), {"Content-Type": "application/x-www-form-urlencoded"}),
        "unsupported_content_type",
    ),
    "json-without-data": (WorkerRequest.json({"image": _b64(png())}), "missing_data"),
    "json-array": (WorkerRequest.json([_b64(png())]), "missing_data"),
    "json-string": (WorkerRequest.json(_b64(png())), "missing_data"),
    "json-data-number": (WorkerRequest.json({"data": 5}), "invalid_data"),
    "json-data-null": (WorkerRequest.json({"data": None}), "invalid_data"),
    "json-data-not-base64": (WorkerRequest.json({"data": "not base64!"}), "invalid_base64"),
    "json-malformed": (WorkerRequest.raw(b'{"data": ', "application/json"), "invalid_json"),
    "json-base64-of-text": (WorkerRequest.json({"data": _b64(b"hello")}), "unsupported_image"),
    "multipart-without-file": (WorkerRequest.multipart({"data": ("", _b64(png()).encode())}), "missing_file"),
    "multipart-two-unnamed-files": (
        WorkerRequest.multipart({"a": ("image/png", png()), "b": ("image/png", png())}),
        "ambiguous_file",
    ),
    "multipart-empty-file": (WorkerRequest.multipart({"data": ("image/png", b"")}), "empty_body"),
}


@pytest.mark.parametrize("payload", list(BAD_PAYLOADS))
def test_bad_payloads_get_400_with_a_json_error(service, decode_input, payload):
    request, error = BAD_PAYLOADS[payload]
    [answer] = ask(service, request)
    assert (answer.status, answer.phrase, answer.content_type) == (400, "Bad Request", "application/json")
    body = answer.json()
    assert body["error"] == error
    assert body["detail"]


@pytest.mark.parametrize(("width", "height"), [(50_000, 50_000), (7_000, 6_000)])
def test_pixel_bombs_get_413_before_decoding(service, width, height):
    # 2.5e9 pixels trips Pillow's own guard first; 42e6 only the spec's 40e6 max_pixels.
    [answer] = ask(service, WorkerRequest.raw(png_header_only(width, height), "image/png"))
    assert (answer.status, answer.phrase) == (413, "Request Entity Too Large")
    assert answer.json()["error"] == "image_too_large"


def test_batch_answers_every_request_on_its_own_and_in_order(service, reference):
    answers = ask(
        service,
        WorkerRequest.raw(png(seed=1), "image/png"),
        WorkerRequest.raw(b"not an image"),
        WorkerRequest.raw(png_header_only(50_000, 50_000), "image/png"),
        WorkerRequest.json({"data": _b64(png(seed=2))}),
        WorkerRequest.raw(png(seed=1), "image/png", {"X-Top-K": "2"}),
    )
    assert [a.status for a in answers] == [200, 400, 413, 200, 200]
    assert_predicts(answers[0], reference(png(seed=1)))
    assert_predicts(answers[3], reference(png(seed=2)))
    assert_predicts(answers[4], reference(png(seed=1)), k=2)


@pytest.mark.parametrize(
    ("request_", "k"),
    [
        (WorkerRequest.raw(png(), "image/png"), 5),
        (WorkerRequest.raw(png(), "image/png", {"X-Top-K": "3"}), 3),
        (WorkerRequest.raw(png(), "image/png", {"x-top-k": " 2 "}), 2),
        (WorkerRequest.raw(png(), "image/png").with_query(topk="4"), 4),
        (WorkerRequest.raw(png(), "image/png").with_query(k="1"), 1),
        (WorkerRequest.raw(png(), "image/png", {"X-Top-K": "7"}).with_query(topk="2"), 2),
        (WorkerRequest.multipart({"data": ("image/png", png()), "topk": ("", b"3")}), 3),
        (WorkerRequest.json({"data": _b64(png()), "topk": 2}), 2),
        (WorkerRequest.json({"data": _b64(png()), "k": "6"}), 6),
        (WorkerRequest.raw(png(), "image/png", {"X-Top-K": "10"}), 10),
        (WorkerRequest.raw(png(), "image/png", {"X-Top-K": "50"}), 10),
    ],
    ids=[
        "default",
        "header",
        "header-lowercase",
        "query-topk",
        "query-k",
        "query-beats-header",
        "form-field",
        "json-topk",
        "json-k-string",
        "all-classes",
        "clamped",
    ],  # fmt: skip
)
def test_top_k_comes_from_parameter_or_header(service, reference, request_, k):
    [answer] = ask(service, request_)
    assert_predicts(answer, reference(png()), k=k)


@pytest.mark.parametrize(
    "request_",
    [
        WorkerRequest.raw(png(), "image/png", {"X-Top-K": value})
        for value in ("0", "-1", "three", "", "2.5", "9" * 5000)
    ]
    + [WorkerRequest.json({"data": _b64(png()), "topk": value}) for value in (True, 2.5, [3])],
    ids=[
        "0",
        "-1",
        "word",
        "empty",
        "decimal",
        "5000-digits",
        "json-true",
        "json-float",
        "json-list",
    ],
)
def test_bad_top_k_gets_400(service, request_):
    [answer] = ask(service, request_)
    assert answer.status == 400
    assert answer.json()["error"] == "invalid_top_k"


def test_bad_input_logs_one_warning_line_and_no_traceback(service, caplog):
    caplog.set_level(logging.INFO)
    ask(service, WorkerRequest.raw(b"not an image"))
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelname) for r in problems] == [("handler.fashion_handler", "WARNING")]
    assert "400 unsupported_image" in problems[0].getMessage()
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records)


def test_an_unforeseen_failure_is_that_request_s_own_400_logged_once(service, reference, monkeypatch, caplog):
    # Fault injection: stands in for any exception the input path does not anticipate today.
    real_to_pixels = fashion_handler.to_pixels

    def failing_on_marker(image: bytes, spec: PreprocessSpec) -> np.ndarray:
        if image == b"marker":
            raise RuntimeError("an input the handler did not foresee")
        return real_to_pixels(image, spec)

    monkeypatch.setattr(fashion_handler, "to_pixels", failing_on_marker)
    counted: list[tuple[int, str]] = []
    handler = service._entry_point.__self__  # the FashionMNISTHandler behind TorchServe's Service
    monkeypatch.setattr(handler.monitor, "rejected", lambda status, error: counted.append((status, error)))
    caplog.set_level(logging.INFO)
    answers = ask(
        service,
        WorkerRequest.raw(png(seed=1), "image/png"),
        WorkerRequest.raw(b"marker", "application/octet-stream"),
        WorkerRequest.raw(png(seed=2), "image/png"),
    )
    assert [a.status for a in answers] == [200, 400, 200]
    assert answers[1].json()["error"] == "unprocessable_input" and "request-1" in answers[1].json()["detail"]
    assert_predicts(answers[0], reference(png(seed=1)))
    assert_predicts(answers[2], reference(png(seed=2)))
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelname, r.exc_info is not None) for r in logged] == [("ERROR", True)]
    assert "request-1" in logged[0].getMessage()
    assert counted == [(400, "unprocessable_input")], "the contained failure must count as a rejected input"


@pytest.mark.parametrize(("value", "threads"), [(None, 1), ("3", 3)])
def test_worker_torch_threads_default_to_one(monkeypatch, value, threads):
    if value is None:
        monkeypatch.delenv(THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(THREADS_ENV, value)
    assert configure_threads() == threads
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("value", ["0", "many", ""])
def test_bad_thread_setting_fails_the_load(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ValueError, match=THREADS_ENV):
        configure_threads()


def _model_with_seven_outputs(directory: Path) -> None:
    make_random_export(directory, model_classes=7)


def _index_naming_other_classes(directory: Path) -> None:
    make_random_export(directory)
    (directory / "index_to_name.json").write_text(json.dumps({str(i): f"c{i}" for i in range(10)}))


@pytest.mark.parametrize(
    ("make_export", "message"),
    [
        (_model_with_seven_outputs, "does not match 10 classes"),
        (_index_naming_other_classes, "both must come from the same export"),
    ],
)
def test_initialize_refuses_a_model_that_disagrees_with_its_metadata(tmp_path, make_export, message):
    make_export(tmp_path)
    with pytest.raises((RuntimeError, MetaError), match=message):
        load_handler(tmp_path)


@pytest.mark.parametrize("index", [{"0": "a", "2": "b"}, {"1": "a"}, {"0": "a", "x": "b"}])
def test_class_index_with_gaps_is_refused(index):
    with pytest.raises(ValueError, match="keys must be 0"):
        class_names(index)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_equal_probabilities_rank_in_class_order_as_argmax_picks(k):
    """An int8 model's logits can tie: the served top-1 must still be the class offline evaluation's
    argmax picks (torch.topk ranked these ties 9 before 0)."""
    probs = torch.softmax(torch.tensor([2.0, 0, 0, 1, 0, 0, 1, 0, 0, 2]), dim=-1)
    ranked = [p["index"] for p in top_k(probs, CLASSES, k)]
    assert ranked == [0, 9, 3, 6, 1, 2, 4, 5, 7, 8][:k]
    assert ranked[0] == int(probs.argmax())
