"""Answer requests from a model directory the way a TorchServe 0.12 worker does, without the JVM.

Everything past the socket is TorchServe's own Python worker code: ts.model_loader imports the
handler from the model directory, builds the Context and calls initialize;
ts.protocol.otf_message_handler decodes request frames exactly as they come off the frontend
socket (including its JSON and text decoding); ts.service.Service.predict turns the handler's
return value and per-request statuses into the response frame. This module only builds the frames
the Java frontend would send, shaped as observed from a real server (see handler/payload.py), and
reads the response frame back.

`python -m archive.build` runs this file on the unpacked .mar in a fresh interpreter where only
the model directory is importable, so the check sees the archive and nothing of the repository:

    PYTHONPATH=/tmp/unpacked python -P archive/selfcheck.py /tmp/unpacked

It prints one JSON line (statuses, top label) and exits 1 with the reason if the archive does not
answer a PNG with 200 and predictions and a non-image body with 400. Tests import the same
functions to drive the handler through the worker code in-process.
"""

from __future__ import annotations

import importlib
import io
import json
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ts
from PIL import Image
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import TsModelLoader
from ts.protocol.otf_message_handler import retrieve_msg
from ts.service import Service

# The metric definitions TorchServe ships; a worker gets the server's metrics config in its place.
DEFAULT_METRICS_CONFIG = Path(ts.__file__).parent / "configs" / "metrics.yaml"


@dataclass(frozen=True)
class WorkerRequest:
    """One HTTP request as the frontend forwards it: HTTP headers, (name, content type, value) parameters."""

    parameters: tuple[tuple[str, str, bytes], ...]
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def raw(
        cls, body: bytes, content_type: str = "", headers: Mapping[str, str] | None = None
    ) -> WorkerRequest:
        """A plain body: the frontend sends it as parameter "body" typed with the bare media type."""
        headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
        return cls((("body", content_type.split(";")[0].strip(), bytes(body)),), headers)

    @classmethod
    def json(cls, obj: Any, headers: Mapping[str, str] | None = None) -> WorkerRequest:
        return cls.raw(json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

    @classmethod
    def multipart(
        cls, fields: Mapping[str, tuple[str, bytes]], headers: Mapping[str, str] | None = None
    ) -> WorkerRequest:
        """multipart/form-data: one parameter per field; text fields have content type ""."""
        params = tuple((name, ctype, bytes(value)) for name, (ctype, value) in fields.items())
        return cls(params, {"Content-Type": "multipart/form-data; boundary=x", **(headers or {})})

    def with_query(self, **params: str) -> WorkerRequest:
        """Query parameters, as /invocations and /{model}/predict forward them (/predictions drops them)."""
        query = tuple((name, "", value.encode()) for name, value in params.items())
        return WorkerRequest(query + self.parameters, self.headers)


@dataclass(frozen=True)
class Answer:
    """One response as the worker hands it back to the frontend."""

    status: int
    phrase: str
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def encode_batch(requests: list[WorkerRequest]) -> bytes:
    """Requests -> an inference frame ("I" command), the layout otf_message_handler reads."""

    def blob(data: bytes) -> bytes:
        return struct.pack("!i", len(data)) + data

    end = struct.pack("!i", -1)
    frame = bytearray(b"I")
    for number, request in enumerate(requests):
        frame += blob(f"request-{number}".encode())
        for name, value in request.headers.items():
            frame += blob(name.encode()) + blob(value.encode())
        frame += end
        for name, content_type, value in request.parameters:
            frame += blob(name.encode()) + blob(content_type.encode()) + blob(value)
        frame += end
    return bytes(frame + end)


def decode_response(frame: bytes) -> list[Answer]:
    """A predict response frame (ts.protocol.otf_message_handler.create_predict_response) -> answers."""
    stream = io.BytesIO(frame)

    def integer() -> int:
        return struct.unpack("!i", stream.read(4))[0]

    def blob() -> bytes:
        return stream.read(integer())

    integer(), blob()  # batch-level code and message; each request carries its own below
    answers = []
    while (id_length := integer()) != -1:
        stream.read(id_length)
        content_type = blob().decode()
        status = integer()
        phrase = blob().decode()
        for _ in range(2 * integer()):  # response headers: content type is already above
            blob()
        answers.append(Answer(status, phrase, content_type, blob()))
    return answers


class _FrameSocket:
    """The part of a socket that otf_message_handler reads from."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self._stream.read(size)


class SelfCheckError(RuntimeError):
    """The archive does not load, or does not answer as the API promises."""


def metrics_cache(model_name: str) -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(DEFAULT_METRICS_CONFIG))
    cache.initialize_cache()
    cache.model_name = model_name
    return cache


def load_service(model_dir: Path, batch_size: int = 8) -> Service:
    """Load an unpacked archive like a worker: handler from MAR-INF/MANIFEST.json, then initialize."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text(encoding="utf-8"))["model"]
    name = manifest["modelName"]
    try:
        # TorchServe answers any ImportError here by looking for a built-in handler of that name,
        # which buries the real cause under "No module named 'ts.torch_handler...'".
        importlib.import_module(Path(manifest["handler"]).stem)
    except ImportError as exc:
        raise SelfCheckError(f"{manifest['handler']} does not import from the archive: {exc}") from exc
    return TsModelLoader().load(
        name, str(model_dir), manifest["handler"], None, batch_size, None, True, metrics_cache(name)
    )


def export_service(model_dir: Path, batch_size: int = 8) -> tuple[Service, Any]:
    """An export (training.export's output, no archive) behind TorchServe's own Service, with the
    repository's handler initialised like a worker does it: for the tests and the handler profile.
    (Imported here, not at the top: load_service must import the handler from the archive.)"""
    from handler import MODEL_NAME
    from handler.fashion_handler import FashionMNISTHandler

    handler = FashionMNISTHandler()
    manifest = {
        "model": {"modelName": MODEL_NAME, "serializedFile": "model.pt", "handler": "fashion_handler.py"}
    }
    service = Service(
        MODEL_NAME,
        str(model_dir),
        manifest,
        handler.handle,
        None,
        batch_size,
        True,
        metrics_cache(MODEL_NAME),
    )
    handler.initialize(service.context)
    return service, handler


def predict(service: Service, requests: list[WorkerRequest]) -> list[Answer]:
    """One batch through the worker's decode -> handler -> encode path."""
    _, batch = retrieve_msg(_FrameSocket(encode_batch(requests)))
    service.set_cl_socket(None)  # only streaming responses write to it
    return decode_response(service.predict(batch))


def sample_png(width: int = 40, height: int = 30) -> bytes:
    """A deterministic RGB gradient PNG. Not 28x28 and not grayscale, so the check exercises
    the colour conversion and the resize that real client images go through."""
    ramp = np.add.outer(np.arange(height), np.arange(width)) * 255 // (width + height - 2)
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 64)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def check(model_dir: Path) -> dict[str, Any]:
    """Load the unpacked archive and answer a PNG (expect 200) and a non-image body (expect 400)."""
    service = load_service(model_dir)
    for module in (
        "handler.meta",
        "handler.preprocess",
        "handler.payload",
        "handler.postprocess",
        "handler.monitor",
        "handler.variants",
    ):
        origin = Path(sys.modules[module].__file__).resolve()
        if not origin.is_relative_to(model_dir.resolve()):
            raise SelfCheckError(f"{module} was imported from {origin}, not from the archive")
    good, bad = predict(
        service, [WorkerRequest.raw(sample_png(), "image/png"), WorkerRequest.raw(b"no image")]
    )
    if good.status != 200:
        raise SelfCheckError(f"a 40x30 RGB PNG got {good.status} {good.phrase}: {good.body[:300]!r}")
    body = good.json()
    index_to_name = json.loads((model_dir / "index_to_name.json").read_text(encoding="utf-8"))
    predictions = body.get("predictions") or []
    if not predictions or any(p.get("label") not in index_to_name.values() for p in predictions):
        raise SelfCheckError(f"a 40x30 RGB PNG got no usable predictions: {body}")
    if bad.status != 400 or "error" not in bad.json():
        raise SelfCheckError(
            f"a non-image body got {bad.status} {bad.body[:300]!r}, expected 400 with an error"
        )
    return {
        "model": body["model"],
        "version": body["version"],
        "statuses": [good.status, bad.status],
        "top": predictions[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -P archive/selfcheck.py UNPACKED_MAR_DIR", file=sys.stderr)
        return 2
    try:
        summary = check(Path(args[0]))
    except SelfCheckError as exc:
        print(f"self-check failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
