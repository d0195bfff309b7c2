"""The REST APIs of a real TorchServe JVM: listeners, registration, inference, batching, parity, logs.

    python -m pytest -m serving tests/test_serving_api.py

The module's server runs on free loopback ports in a temporary instance directory. It is started
and stopped with serving.server's own `start`/`stop` (so they are tested too) and always stopped
in teardown. Tests that need the model register it through the management API and unregister it
afterwards, so every test starts from a server with no models. The command line is tested in
tests/test_serving_cli.py.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import torch

from serving import MODEL_NAME as MODEL
from serving.client import Client, RequestFailed
from serving.images import encode
from serving.loadgen import post_all
from serving.server import ANY_PORTS, Instance, ServeError, read_record, running, start, stop
from serving.tsconfig import parse_properties, render
from serving.waiting import wait_for
from tests.live_server import inference_headers, offline_probabilities, predictions_url, running_server
from tests.reliability import random_archive
from training.data import Split, load_split

pytestmark = pytest.mark.serving

MAX_REQUEST_SIZE = int(parse_properties(render("local"))["max_request_size"])
# Long enough that a batch which did not fill up would visibly wait for it.
SLOW_BATCH_DELAY_MS = 10_000


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_split(real_data_root: Path) -> Split:
    return load_split(real_data_root, "test")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mar_file: Path) -> Iterator[Instance]:
    with running_server(mar_file.parent, tmp_path_factory.mktemp("serve"), "api") as instance:
        yield instance


@pytest.fixture
def client(server: Instance) -> Iterator[Client]:
    client = Client.for_instance(server)
    yield client
    client.close()


@contextmanager
def registered(client: Client, **settings: Any) -> Iterator[Client]:
    client.register(**settings)
    try:
        yield client
    finally:
        if any(entry["modelName"] == MODEL for entry in client.models()):
            client.unregister()


@pytest.fixture
def model(client: Client) -> Iterator[Client]:
    """The client, with the model registered with the archive's own settings."""
    with registered(client):
        yield client


def first_pngs(split: Split, count: int) -> list[bytes]:
    return [encode(image) for image in split.images[:count].numpy()]


def truncated_png() -> bytes:
    whole = encode(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    return whole[: len(whole) // 2]


def bomb_png() -> bytes:
    """A 60-byte PNG whose header declares 10000x10000 pixels (over the 40M-pixel limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- server and configuration ------------------------------------------------------------------------


def test_ping_reports_healthy(client: Client) -> None:
    assert client.ping() == {"status": "Healthy"}


def test_every_listener_binds_loopback_only(server: Instance) -> None:
    def plain(ip: str) -> str:  # Java listens on IPv6 sockets: 127.0.0.1 shows as ::ffff:127.0.0.1
        address = ipaddress.ip_address(ip)
        return str(getattr(address, "ipv4_mapped", None) or address)

    def listening() -> set[tuple[str, int]]:
        return {
            (plain(conn.laddr.ip), conn.laddr.port)
            for conn in psutil.Process(record.pid).net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        }

    record = read_record(server)
    expected = {("127.0.0.1", port) for port in record.ports.values()}
    # gRPC binds a moment after REST answers.
    wait_for(lambda: len(listening()) >= len(expected), 10, "every listener to bind")
    assert listening() == expected


def test_no_config_snapshots_are_written(server: Instance, model: Client) -> None:
    # TorchServe writes snapshots to <LOG_LOCATION>/config after every registration unless --ncs.
    assert not (server.log_dir / "config").exists()


def test_second_start_of_a_running_instance_is_refused(server: Instance, mar_file: Path) -> None:
    with pytest.raises(ServeError, match="already running"):
        start(server, mar_file.parent, ANY_PORTS)


def test_start_explains_a_port_in_use(tmp_path: Path, mar_file: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {**ANY_PORTS, "grpc_inference": busy.getsockname()[1]}
        with pytest.raises(ServeError, match=r"\(grpc_inference\) on 127.0.0.1 is in use"):
            start(Instance("busy", tmp_path), mar_file.parent, ports)


def test_stop_returns_after_the_jvm_and_its_workers_exited(tmp_path: Path, mar_file: Path) -> None:
    instance = Instance("lifecycle", tmp_path)
    started = start(instance, mar_file.parent, ANY_PORTS)
    try:
        Client.for_instance(instance).register()
        jvm = psutil.Process(started.pid)
        family = [jvm, *jvm.children(recursive=True)]
    finally:
        stopped = stop(instance)
    assert stopped
    assert len(family) >= 2, "expected the JVM and at least one Python worker"
    assert [proc.pid for proc in family if alive(proc)] == []
    assert running(instance) is None and not instance.key_file.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(started.url("inference") + "/ping", timeout=5)


def test_metrics_are_prometheus_text_without_a_key(
    server: Instance, model: Client, test_split: Split
) -> None:
    assert model.predict(first_pngs(test_split, 1)[0]).model == MODEL
    resp = requests.get(read_record(server).url("metrics") + "/metrics", timeout=30)
    assert resp.status_code == 200
    assert re.search(rf'^ts_inference_requests_total\{{model_name="{MODEL}".*\}} [1-9]', resp.text, re.M)


# --- registration ---------------------------------------------------------------------------------


def test_register_with_the_management_key_is_200(client: Client) -> None:
    params = {"url": f"{MODEL}.mar", "synchronous": "true"}
    resp = client.call("management", "POST", "/models", params=params)
    try:
        assert resp.status_code == 200, resp.text
        assert [entry["modelName"] for entry in client.models()] == [MODEL]
    finally:
        client.unregister()


@pytest.mark.parametrize("authorization", [None, "Bearer not-the-key", "inference-key"])
def test_register_without_the_management_key_is_refused(client: Client, authorization: str | None) -> None:
    # TorchServe 0.12 has no 401: a missing or wrong key is 400 InvalidKeyException.
    headers = {}
    if authorization == "inference-key":
        headers["Authorization"] = f"Bearer {client.key('inference')}"
    elif authorization is not None:
        headers["Authorization"] = authorization
    resp = requests.post(
        client.urls["management"] + "/models", params={"url": f"{MODEL}.mar"}, headers=headers, timeout=30
    )
    assert (resp.status_code, resp.json()["type"]) == (400, "InvalidKeyException")
    assert client.models() == []


@pytest.fixture
def url_trap(mar_file: Path) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server offering the real archive and recording every request it gets."""
    hits: list[str] = []
    payload = mar_file.read_bytes()

    class Trap(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass  # keep the test output clean

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trap)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("{trap}/fashion_mnist.mar", "does not match any allowed URL"),
        ("https://example.invalid/fashion_mnist.mar", "does not match any allowed URL"),
        ("file://{store}/fashion_mnist.mar", "does not match any allowed URL"),
        ("../{store_name}/fashion_mnist.mar", "Relative path is not allowed"),
    ],
    ids=["http-to-loopback", "https", "file-url", "dot-dot"],
)
def test_registration_refuses_urls_and_paths_outside_the_store(
    client: Client, server: Instance, url_trap: tuple[str, list[str]], url: str, refusal: str
) -> None:
    trap, hits = url_trap
    store = Path(read_record(server).model_store)
    url = url.format(trap=trap, store=store, store_name=store.name)
    resp = client.call("management", "POST", "/models", params={"url": url, "synchronous": "true"})
    assert resp.status_code == 404 and refusal in resp.json()["message"], resp.text
    assert hits == [], "TorchServe fetched a URL it should have refused"
    assert client.models() == []


# --- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("top_k", "expected"), [(None, 5), (1, 1), (10, 10)])
def test_prediction_is_top_k_with_labels_and_version(
    model: Client, served_model_dir: Path, test_split: Split, top_k: int | None, expected: int
) -> None:
    body = first_pngs(test_split, 1)[0]
    meta = json.loads((served_model_dir / "model_meta.json").read_text())
    answer = model.predict(body, top_k=top_k)
    assert (answer.model, answer.version) == (MODEL, meta["version"])
    preds = answer.predictions
    assert len(preds) == expected
    assert [p.label for p in preds] == [meta["classes"][p.index] for p in preds]
    assert [p.probability for p in preds] == sorted((p.probability for p in preds), reverse=True)
    assert preds[0].index == int(offline_probabilities(served_model_dir, [body])[0].argmax())


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [(b"not an image", 400, "unsupported_image"), (bomb_png(), 413, "image_too_large")],
    ids=["garbage", "decompression-bomb"],
)
def test_predict_raises_one_error_type_carrying_status_and_json(
    model: Client, body: bytes, status: int, error: str
) -> None:
    with pytest.raises(RequestFailed) as refused:
        model.predict(body)
    assert (refused.value.status, refused.value.body["error"], refused.value.kind) == (status, error, error)
    assert refused.value.detail and str(status) in str(refused.value)


def test_predict_of_an_unknown_model_raises_with_the_404_and_a_hint(model: Client) -> None:
    with pytest.raises(RequestFailed, match="is not registered") as refused:
        model.predict(b"x", model="no_such_model")
    assert (refused.value.status, refused.value.kind) == (404, "ModelNotFoundException")


def test_prediction_after_unregister_is_404(client: Client, test_split: Split) -> None:
    body = first_pngs(test_split, 1)[0]
    with registered(client):
        assert client.predict(body).model == MODEL
        client.unregister()
    resp = requests.post(predictions_url(client), data=body, headers=inference_headers(client), timeout=30)
    assert (resp.status_code, resp.json()["type"]) == (404, "ModelNotFoundException")


def test_scaling_sets_the_number_of_ready_workers(model: Client) -> None:
    def ready() -> int:
        return sum(worker["status"] == "READY" for worker in model.describe()[0]["workers"])

    model.scale(2, 2)
    assert ready() == 2
    model.scale(1, 1)
    wait_for(lambda: ready() == 1 and len(model.describe()[0]["workers"]) == 1, 30, "one worker left")


def test_large_real_image_under_the_size_limit_is_answered(model: Client) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (780, 780, 3), dtype=np.uint8)
    body = encode(noise)  # noise does not compress: ~1.8 MB
    assert 0.8 * MAX_REQUEST_SIZE < len(body) < MAX_REQUEST_SIZE
    assert model.predict(body).model == MODEL


def test_body_over_max_request_size_is_413_and_serving_goes_on(model: Client, test_split: Split) -> None:
    resp = requests.post(
        predictions_url(model),
        data=b"\0" * (MAX_REQUEST_SIZE + 1),
        headers=inference_headers(model),
        timeout=60,
    )
    assert resp.status_code == 413
    assert model.predict(first_pngs(test_split, 1)[0]).model == MODEL


def test_expired_inference_key_is_renewed_through_the_token_api(server: Instance, client: Client) -> None:
    keys = json.loads(server.key_file.read_text())
    old = keys["inference"]["key"]
    keys["inference"]["expiration time"] = "2000-01-01T00:00:00Z"
    server.key_file.write_text(json.dumps(keys))
    assert client.key("inference") != old
    assert client.ping() == {"status": "Healthy"}
    stale = requests.get(
        client.urls["inference"] + "/ping", headers={"Authorization": f"Bearer {old}"}, timeout=30
    )
    assert (stale.status_code, stale.json()["type"]) == (400, "InvalidKeyException")


# --- batching -------------------------------------------------------------------------------------


def test_concurrent_batched_requests_each_get_their_own_answer(
    client: Client, served_model_dir: Path, test_split: Split
) -> None:
    bodies = first_pngs(test_split, 256)
    expected = offline_probabilities(served_model_dir, bodies)
    with registered(client, batch_size=8, max_batch_delay=50):
        assert client.describe()[0]["batchSize"] == 8
        answers = post_all(predictions_url(client), bodies, inference_headers(client), clients=16)

    def matches(i: int, status: int, answer: Any) -> bool:
        preds = answer["predictions"] if status == 200 else []
        return (
            status == 200
            and preds[0]["index"] == int(expected[i].argmax())
            and all(abs(p["probability"] - float(expected[i, p["index"]])) < 1e-4 for p in preds)
        )

    assert [i for i, (status, answer) in enumerate(answers) if not matches(i, status, answer)] == []


@pytest.mark.solo  # one shared batch is shown by answers in under half the 10 s batch delay
@pytest.mark.parametrize(
    ("bad_body", "status", "error"),
    [
        (b"not an image", 400, "unsupported_image"),
        (truncated_png(), 400, "corrupt_image"),
        (bomb_png(), 413, "image_too_large"),
    ],
    ids=["garbage", "truncated-png", "decompression-bomb"],
)
def test_bad_image_in_a_batch_fails_alone(
    client: Client,
    served_model_dir: Path,
    test_split: Split,
    bad_body: bytes,
    status: int,
    error: str,
) -> None:
    good = first_pngs(test_split, 7)
    bodies = [*good[:3], bad_body, *good[3:]]
    with registered(client, batch_size=8, max_batch_delay=SLOW_BATCH_DELAY_MS):
        start = time.monotonic()
        answers = post_all(predictions_url(client), bodies, inference_headers(client), clients=8)
        elapsed = time.monotonic() - start
    # A batch leaves the queue when it holds 8 requests or after max_batch_delay: answers well
    # before the delay mean all 8 requests went through the model as one batch.
    assert elapsed < SLOW_BATCH_DELAY_MS / 1000 / 2
    assert [code for code, _ in answers] == [200, 200, 200, status, 200, 200, 200, 200]
    assert answers[3][1]["error"] == error and answers[3][1]["detail"]
    served = [answer["predictions"][0]["index"] for code, answer in answers if code == 200]
    assert served == offline_probabilities(served_model_dir, good).argmax(1).tolist()


# --- logs -----------------------------------------------------------------------------------------


def test_bad_input_is_logged_as_one_line_without_a_traceback(server: Instance, model: Client) -> None:
    for body in (b"not an image", truncated_png(), bomb_png(), b""):
        with pytest.raises(RequestFailed) as refused:
            model.predict(body)
        assert refused.value.status in (400, 413)
    wait_for(lambda: server.log_file.read_text().count("rejected: 4") >= 4, 10, "4 rejections in the log")
    # The model's workers' lines only (thread W-<port>-...; every line of a worker's output carries it):
    # TorchServe's own system-metrics collector can log a BrokenPipe traceback of its own on a busy
    # host, which says nothing about how input is handled.
    log = "\n".join(line for line in server.log_file.read_text().splitlines() if re.search(r"\[W-\d+-", line))
    assert "rejected: 4" in log
    assert "Traceback" not in log and "Invoking custom service failed" not in log


def test_requests_add_access_log_lines_but_no_server_log_lines(
    server: Instance, model: Client, test_split: Split
) -> None:
    body = first_pngs(test_split, 1)[0]
    access_log = server.log_dir / "access_log.log"

    def lines(path: Path) -> int:
        return path.read_text().count("\n")

    model.predict(body)
    wait_for(lambda: "/predictions/" in access_log.read_text(), 10, "the access log line")
    before_server, before_access = lines(server.log_file), lines(access_log)
    for _ in range(20):
        model.predict(body)  # raises RequestFailed unless 200
    wait_for(lambda: lines(access_log) >= before_access + 20, 10, "20 access log lines")
    assert lines(server.log_file) == before_server


# --- parity ---------------------------------------------------------------------------------------


def test_served_classes_match_offline_evaluation_on_the_whole_test_set(
    model: Client, served_model_dir: Path, test_split: Split, capsys: pytest.CaptureFixture[str]
) -> None:
    bodies = first_pngs(test_split, len(test_split))
    offline = offline_probabilities(served_model_dir, bodies).argmax(1)
    start = time.monotonic()
    answers = post_all(predictions_url(model), bodies, inference_headers(model, top_k=1), clients=16)
    elapsed = time.monotonic() - start
    assert [i for i, (code, _) in enumerate(answers) if code != 200] == []
    served = torch.tensor([answer["predictions"][0]["index"] for _, answer in answers])
    labels = test_split.labels
    with capsys.disabled():
        print(
            f"\nparity: {len(bodies)} PNGs through REST in {elapsed:.1f}s ({len(bodies) / elapsed:.0f}/s): "
            f"served accuracy {(served == labels).float().mean():.4f}, "
            f"offline accuracy {(offline == labels).float().mean():.4f}"
        )
    assert (served != offline).nonzero().flatten().tolist() == []


# --- what ships -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "tokens"), [("container", True), ("pod", False)])
def test_the_shipped_configs_serve_on_loopback(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, test_split: Split, target: str, tokens: bool
) -> None:
    """The container's and the pod's TorchServe settings, run locally: the model they load at start
    answers, with a key only where token authorization is on."""
    instance = Instance(target, tmp_path)
    start(instance, random_archive(tmp_path_factory).store, ANY_PORTS, target=target)
    try:
        client = Client.for_instance(instance)
        assert (client.key_file is not None, instance.key_file.is_file()) == (tokens, tokens)
        wait_for(lambda: client.models(), 60, f"the {target} config to load its model at start")
        assert client.predict(first_pngs(test_split, 1)[0]).model == MODEL
        config = parse_properties(instance.config_file.read_text())
        assert config["vmargs"] == parse_properties(render("local"))["vmargs"]
    finally:
        stop(instance)
