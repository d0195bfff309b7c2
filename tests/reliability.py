"""Helpers for the reliability tests (test_hostile, test_auth, test_faults, test_soak): a throw-away
model store, HTTP requests written byte for byte, and the checks every fault test repeats.

The servers in those tests run an archive of a random-weights export, built once per test run
with the project's own archive step: what they check (status codes, batching, worker restarts, memory)
does not depend on what the model learned, and no training run is needed. Answers are still checked
exactly, against the same export evaluated offline.

Requests go over raw sockets rather than an HTTP library, so a test can send what a library would
refuse to (a 70 kB header, a non-UTF-8 file name, a body over the size limit) and can see on the
wire that each request gets exactly one response.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from archive.build import ServingConfig, build
from handler.variants import EXPORTED_VARIANT
from serving import MODEL_NAME
from serving.client import Client
from serving.server import ANY_PORTS, Instance, start, stop
from serving.tsconfig import override, parse_properties, render
from serving.waiting import wait_for
from tests.conftest import build_once, make_random_export

# The TorchServe settings of each place the model is served, as properties text (serving.tsconfig's
# render of each target). The reliability suites run a local variant of each (`local_variant`);
# "local-worker-decodes" is the local target with TorchServe's default decode_input_request=true,
# the other mode a worker can run in.
TARGET_CONFIGS: dict[str, Callable[[], str]] = {
    "local": lambda: render("local"),
    "local-worker-decodes": lambda: override(
        render("local"), {"decode_input_request": "true"}, "tests: the worker decodes bodies"
    ),
    "container": lambda: render("container"),
    "pod": lambda: render("pod"),
}
PREDICT_PATH = f"/predictions/{MODEL_NAME}"
# Lines that mean the server or a worker hit something unexpected; bad input must never cause them.
# The handler logs "unforeseen failure" for an input it did not foresee (answered 400 on its own).
TROUBLE = ("Invoking custom service failed", "Backend worker process died", " ERROR ", "unforeseen failure")


@dataclass(frozen=True)
class RandomArchive:
    export: Path  # the export the archive was built from (for offline answers)
    store: Path  # a model store holding fashion_mnist.mar


def random_archive(
    tmp_path_factory: pytest.TempPathFactory, serving: ServingConfig | None = None
) -> RandomArchive:
    """The run's random-weights export and an archive of it (its fp32 variant), built on first use
    (about 15 s) and shared by every xdist worker (tests.conftest.build_once).

    `serving`: the archive's model-config.yaml (default: archive.build's); one archive per setting.
    """
    export = build_once(tmp_path_factory, "random-export", make_random_export)
    # Random weights have no accuracy for int8 to keep: archive the export itself.
    setting = "" if serving is None else "-" + hashlib.sha256(repr(serving).encode()).hexdigest()[:8]
    store = build_once(
        tmp_path_factory,
        f"random-store{setting}",
        lambda out: build(export, out, config=serving, variant=EXPORTED_VARIANT),
    )
    return RandomArchive(export, store)


def local_variant(properties: str, store: Path) -> str:
    """A target's TorchServe settings made runnable here, everything else kept: this run's model store.

    serving.server.start sets loopback addresses on free ports and runs the server in its own state dir.
    """
    return override(properties, {"model_store": str(store)}, "tests: this run's private model store")


@contextlib.contextmanager
def serving_store_copy(
    tmp_path_factory: pytest.TempPathFactory,
    archive: RandomArchive,
    name: str,
    config: str | None = None,
    **register: Any,
) -> Iterator[Instance]:
    """A running server with the model loaded; its store is a private copy tests may add archives to.

    `config`: a target's properties text (`TARGET_CONFIGS`), run as its `local_variant` (default: the
    repository's config.properties). A config that loads the model at start (load_models) gets no
    registration, as in its target; otherwise the model is registered with `register`.
    """
    store = tmp_path_factory.mktemp("store")
    shutil.copyfile(archive.store / f"{MODEL_NAME}.mar", store / f"{MODEL_NAME}.mar")
    instance = Instance(name, tmp_path_factory.mktemp("serve"))
    start(instance, store, ANY_PORTS, config=None if config is None else local_variant(config, store))
    try:
        client = Client.for_instance(instance)
        if config is None or "load_models" not in parse_properties(config):
            client.register(**register)
        else:
            wait_for(lambda: worker_pids(client), 120, "a worker of the model load_models names")
        yield instance
    finally:
        stop(instance)


# --- requests and responses on the wire ----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    method: str,
    path: str,
    headers: Mapping[str, str | bytes] | None = None,
    body: bytes = b"",
    chunk_size: int | None = None,
) -> bytes:
    """An HTTP/1.1 request as bytes. Header values may be bytes (sent as they are, even non-UTF-8);
    `chunk_size` sends the body with Transfer-Encoding: chunked instead of a Content-Length."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    if chunk_size is None:
        lines.append(f"Content-Length: {len(body)}".encode())
        payload = body
    else:
        lines.append(b"Transfer-Encoding: chunked")
        chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


class WireError(AssertionError):
    """The server broke HTTP: no response, a malformed one, or more than one for a request."""


def _read_reply(stream: BinaryIO) -> Reply:
    status_line = stream.readline()
    if not status_line:
        raise WireError("the server closed the connection without a response")
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise WireError(f"not an HTTP status line: {status_line!r}")
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise WireError(f"response without Content-Length: {status_line!r} {headers}")
    length = int(headers["content-length"])
    body = stream.read(length)
    if len(body) != length:
        raise WireError(f"response body cut short: {len(body)} of {length} bytes")
    return Reply(int(parts[1]), headers, body)


def exchange(port: int, request: bytes, inference_key: str, timeout: float = 60.0) -> Reply:
    """Send `request` on a new connection, read its response, and prove it is the only one.

    After the response either the server closes the connection (it does after 4xx) and nothing more
    arrives, or it keeps it open and the next response on it answers a GET /ping sent afterwards; a
    duplicated response would be read there instead. Raises WireError otherwise, or on a timeout
    (a lost request).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may answer and close before the whole body is sent (413): read that answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        stream = sock.makefile("rb")
        try:
            reply = _read_reply(stream)
        except TimeoutError:
            raise WireError(f"no response within {timeout:.0f} s") from None
        if reply.headers.get("connection", "").lower() == "close":
            try:
                extra = stream.read()
            except ConnectionResetError:
                extra = b""  # a reset after the response: nothing else was sent
            except TimeoutError:
                raise WireError("the server said it would close the connection, but kept it open") from None
            if extra:
                raise WireError(f"more bytes after a response on a closed connection: {extra[:200]!r}")
            return reply
        try:
            sock.sendall(http_request("GET", "/ping", {"Authorization": f"Bearer {inference_key}"}))
            follow_up = _read_reply(stream)
        except (OSError, TimeoutError) as exc:
            raise WireError(f"keep-alive connection unusable after the response: {exc!r}") from None
        if (follow_up.status, follow_up.body and follow_up.json()) != (200, {"status": "Healthy"}):
            raise WireError(
                f"a second response followed the first: {follow_up.status} {follow_up.body[:200]!r}"
            )
        return reply


def exchange_all(
    port: int, requests: Sequence[bytes], inference_key: str, clients: int = 8, timeout: float = 60.0
) -> list[Reply]:
    """`exchange` every request from `clients` threads at once; replies in request order."""
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(lambda request: exchange(port, request, inference_key, timeout), requests))


# --- server state ------------------------------------------------------------------------------------


def worker_pids(client: Client, model: str = MODEL_NAME) -> dict[str, int]:
    """Worker id -> PID of the model's workers that are READY (from the management API)."""
    return {
        worker["id"]: worker["pid"]
        for version in client.describe(model)
        for worker in version["workers"]
        if worker["status"] == "READY"
    }


def settle_log(client: Client, log_file: Path, batch_size: int = 1) -> str:
    """The whole server log, once everything the worker printed so far has reached it.

    A worker writes its log lines to one stdout stream that the JVM copies into the log in order.
    The handler logs each rejected request with its request id, so once the rejections of empty
    requests sent now are in the log, every line the worker printed before them is there too.
    `batch_size` empty requests are sent at once, so a batching model answers without waiting.
    """
    port = int(client.urls["inference"].rsplit(":", 1)[1])
    key = client.key("inference")
    empty = http_request(
        "POST", PREDICT_PATH, {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    )
    replies = exchange_all(port, [empty] * batch_size, key, clients=batch_size)
    assert [reply.status for reply in replies] == [400] * batch_size, replies
    markers = [reply.headers["x-request-id"] for reply in replies]

    def arrived() -> bool:
        text = log_file.read_text(errors="replace")
        return all(marker in text for marker in markers)

    wait_for(arrived, 30, f"the rejections of {markers} to reach {log_file}")
    return log_file.read_text(errors="replace")


def trouble(log_text: str, worker_decodes: bool = False) -> list[str]:
    """The lines of a server log that show a traceback, a failed handler call or a dead worker.

    `worker_decodes` (decode_input_request=true): TorchServe's worker then logs a warning with a
    traceback for every JSON or text body it cannot decode before it hands over the bytes, which is
    its normal behaviour; only the other marks count.
    """
    marks = TROUBLE if worker_decodes else ("Traceback", *TROUBLE)
    return [line for line in log_text.splitlines() if any(mark in line for mark in marks)]
