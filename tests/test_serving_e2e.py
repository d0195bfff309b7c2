"""End-to-end tests against a real TorchServe JVM: registration, inference, batching, parity, logs.

    python -m pytest -m serving tests/test_serving_e2e.py

The module's server runs on free loopback ports in a temporary instance directory. It is started
and stopped with scripts.serve's own `start`/`stop` (so they are tested too) and always stopped
in teardown. Tests that need the model register it through the management API and unregister it
afterwards, so every test starts from a server with no models.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image

from scripts import serve
from tests.serving import offline_probabilities, png_bytes, post_concurrently
from training.data import Split, load_split

pytestmark = pytest.mark.serving

MODEL = serve.MODEL_NAME
ANY_PORTS = dict.fromkeys(serve.DEFAULT_PORTS, 0)
# Long enough that a batch which did not fill up would visibly wait for it.
SLOW_BATCH_DELAY_MS = 10_000


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_split(real_data_root: Path) -> Split:
    return load_split(real_data_root, "test")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mar_file: Path) -> Iterator[serve.Instance]:
    instance = serve.Instance("e2e", tmp_path_factory.mktemp("serve"))
    serve.start(instance, mar_file.parent, ANY_PORTS)
    try:
        yield instance
    finally:
        serve.stop(instance)


@pytest.fixture
def client(server: serve.Instance) -> Iterator[serve.Client]:
    client = serve.Client.for_instance(server)
    yield client
    client.close()


@contextmanager
def registered(client: serve.Client, **settings: Any) -> Iterator[serve.Client]:
    client.register(**settings)
    try:
        yield client
    finally:
        if any(entry["modelName"] == MODEL for entry in client.models()):
            client.unregister()


@pytest.fixture
def model(client: serve.Client) -> Iterator[serve.Client]:
    """The client, with the model registered with the archive's own settings."""
    with registered(client):
        yield client


def predictions_url(client: serve.Client) -> str:
    return f"{client.urls['inference']}/predictions/{MODEL}"


def inference_headers(client: serve.Client, top_k: int = 5) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {client.key('inference')}",
        "Content-Type": "application/octet-stream",
        "X-Top-K": str(top_k),
    }


def first_pngs(split: Split, count: int) -> list[bytes]:
    return [png_bytes(image) for image in split.images[:count].numpy()]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds passed (log lines arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def truncated_png() -> bytes:
    whole = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
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


def cli(instance: serve.Instance, *args: str) -> list[str]:
    return ["--state-dir", str(instance.state_root), "--instance", instance.name, *args]


# --- server and configuration ------------------------------------------------------------------------


def test_ping_reports_healthy(client: serve.Client) -> None:
    assert client.ping() == {"status": "Healthy"}


def test_every_listener_binds_loopback_only(server: serve.Instance) -> None:
    def plain(ip: str) -> str:  # Java listens on IPv6 sockets: 127.0.0.1 shows as ::ffff:127.0.0.1
        address = ipaddress.ip_address(ip)
        return str(getattr(address, "ipv4_mapped", None) or address)

    def listening() -> set[tuple[str, int]]:
        return {
            (plain(conn.laddr.ip), conn.laddr.port)
            for conn in psutil.Process(record.pid).net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        }

    record = serve.read_record(server)
    expected = {("127.0.0.1", port) for port in record.ports.values()}
    wait_for(lambda: len(listening()) >= len(expected))  # gRPC binds a moment after REST answers
    assert listening() == expected


def test_no_config_snapshots_are_written(server: serve.Instance, model: serve.Client) -> None:
    # TorchServe writes snapshots to <LOG_LOCATION>/config after every registration unless --ncs.
    assert not (server.log_dir / "config").exists()


def test_second_start_of_a_running_instance_is_refused(server: serve.Instance, mar_file: Path) -> None:
    with pytest.raises(serve.ServeError, match="already running"):
        serve.start(server, mar_file.parent, ANY_PORTS)


def test_start_explains_a_port_in_use(tmp_path: Path, mar_file: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {**ANY_PORTS, "grpc_inference": busy.getsockname()[1]}
        with pytest.raises(serve.ServeError, match=r"\(grpc_inference\) on 127.0.0.1 is in use"):
            serve.start(serve.Instance("busy", tmp_path), mar_file.parent, ports)


def test_stop_returns_after_the_jvm_and_its_workers_exited(tmp_path: Path, mar_file: Path) -> None:
    instance = serve.Instance("lifecycle", tmp_path)
    started = serve.start(instance, mar_file.parent, ANY_PORTS)
    try:
        serve.Client.for_instance(instance).register()
        jvm = psutil.Process(started.pid)
        family = [jvm, *jvm.children(recursive=True)]
    finally:
        stopped = serve.stop(instance)
    assert stopped
    assert len(family) >= 2, "expected the JVM and at least one Python worker"
    assert [proc.pid for proc in family if alive(proc)] == []
    assert serve.running(instance) is None and not instance.key_file.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(started.url("inference") + "/ping", timeout=5)


def test_metrics_are_prometheus_text_without_a_key(
    server: serve.Instance, model: serve.Client, test_split: Split
) -> None:
    assert model.predict(first_pngs(test_split, 1)[0]).status_code == 200
    resp = requests.get(serve.read_record(server).url("metrics") + "/metrics", timeout=30)
    assert resp.status_code == 200
    assert re.search(rf'^ts_inference_requests_total\{{model_name="{MODEL}".*\}} [1-9]', resp.text, re.M)


# --- registration ---------------------------------------------------------------------------------


def test_register_with_the_management_key_is_200(client: serve.Client) -> None:
    params = {"url": f"{MODEL}.mar", "synchronous": "true"}
    resp = client.call("management", "POST", "/models", params=params)
    try:
        assert resp.status_code == 200, resp.text
        assert [entry["modelName"] for entry in client.models()] == [MODEL]
    finally:
        client.unregister()


@pytest.mark.parametrize("authorization", [None, "Bearer not-the-key", "inference-key"])
def test_register_without_the_management_key_is_refused(
    client: serve.Client, authorization: str | None
) -> None:
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
    client: serve.Client, server: serve.Instance, url_trap: tuple[str, list[str]], url: str, refusal: str
) -> None:
    trap, hits = url_trap
    store = Path(serve.read_record(server).model_store)
    url = url.format(trap=trap, store=store, store_name=store.name)
    resp = client.call("management", "POST", "/models", params={"url": url, "synchronous": "true"})
    assert resp.status_code == 404 and refusal in resp.json()["message"], resp.text
    assert hits == [], "TorchServe fetched a URL it should have refused"
    assert client.models() == []


# --- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("top_k", "expected"), [(None, 5), (1, 1), (10, 10)])
def test_prediction_is_top_k_with_labels_and_version(
    model: serve.Client, export_dir: Path, test_split: Split, top_k: int | None, expected: int
) -> None:
    body = first_pngs(test_split, 1)[0]
    meta = json.loads((export_dir / "model_meta.json").read_text())
    resp = model.predict(body, top_k=top_k)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert (answer["model"], answer["version"]) == (MODEL, meta["version"])
    preds = answer["predictions"]
    assert len(preds) == expected
    assert [p["label"] for p in preds] == [meta["classes"][p["index"]] for p in preds]
    assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
    assert preds[0]["index"] == int(offline_probabilities(export_dir, [body])[0].argmax())


def test_prediction_after_unregister_is_404(client: serve.Client, test_split: Split) -> None:
    body = first_pngs(test_split, 1)[0]
    with registered(client):
        assert client.predict(body).status_code == 200
        client.unregister()
    resp = requests.post(predictions_url(client), data=body, headers=inference_headers(client), timeout=30)
    assert (resp.status_code, resp.json()["type"]) == (404, "ModelNotFoundException")


def test_scaling_sets_the_number_of_ready_workers(model: serve.Client) -> None:
    def ready() -> int:
        return sum(worker["status"] == "READY" for worker in model.describe()[0]["workers"])

    model.scale(2, 2)
    assert ready() == 2
    model.scale(1, 1)
    assert wait_for(lambda: ready() == 1 and len(model.describe()[0]["workers"]) == 1)


def test_large_real_image_under_the_size_limit_is_answered(model: serve.Client) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1700, 1700, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")  # noise does not compress: ~8.7 MB
    assert 8_000_000 < len(buf.getvalue()) < 10 * 1024 * 1024
    assert model.predict(buf.getvalue()).status_code == 200


def test_body_over_max_request_size_is_413_and_serving_goes_on(
    model: serve.Client, test_split: Split
) -> None:
    limit = int(re.search(r"^max_request_size=(\d+)$", serve.CONFIG_FILE.read_text(), re.M).group(1))
    resp = requests.post(
        predictions_url(model), data=b"\0" * (limit + 1), headers=inference_headers(model), timeout=60
    )
    assert resp.status_code == 413
    assert model.predict(first_pngs(test_split, 1)[0]).status_code == 200


def test_expired_inference_key_is_renewed_through_the_token_api(
    server: serve.Instance, client: serve.Client
) -> None:
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
    client: serve.Client, export_dir: Path, test_split: Split
) -> None:
    bodies = first_pngs(test_split, 256)
    expected = offline_probabilities(export_dir, bodies)
    with registered(client, batch_size=8, max_batch_delay=50):
        assert client.describe()[0]["batchSize"] == 8
        answers = post_concurrently(predictions_url(client), bodies, inference_headers(client), clients=16)

    def matches(i: int, status: int, answer: Any) -> bool:
        preds = answer["predictions"] if status == 200 else []
        return (
            status == 200
            and preds[0]["index"] == int(expected[i].argmax())
            and all(abs(p["probability"] - float(expected[i, p["index"]])) < 1e-4 for p in preds)
        )

    assert [i for i, (status, answer) in enumerate(answers) if not matches(i, status, answer)] == []


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
    client: serve.Client,
    export_dir: Path,
    test_split: Split,
    bad_body: bytes,
    status: int,
    error: str,
) -> None:
    good = first_pngs(test_split, 7)
    bodies = [*good[:3], bad_body, *good[3:]]
    with registered(client, batch_size=8, max_batch_delay=SLOW_BATCH_DELAY_MS):
        start = time.monotonic()
        answers = post_concurrently(predictions_url(client), bodies, inference_headers(client), clients=8)
        elapsed = time.monotonic() - start
    # A batch leaves the queue when it holds 8 requests or after max_batch_delay: answers well
    # before the delay mean all 8 requests went through the model as one batch.
    assert elapsed < SLOW_BATCH_DELAY_MS / 1000 / 2
    assert [code for code, _ in answers] == [200, 200, 200, status, 200, 200, 200, 200]
    assert answers[3][1]["error"] == error and answers[3][1]["detail"]
    served = [answer["predictions"][0]["index"] for code, answer in answers if code == 200]
    assert served == offline_probabilities(export_dir, good).argmax(1).tolist()


# --- logs -----------------------------------------------------------------------------------------


def test_bad_input_is_logged_as_one_line_without_a_traceback(
    server: serve.Instance, model: serve.Client
) -> None:
    for body in (b"not an image", truncated_png(), bomb_png(), b""):
        assert model.predict(body).status_code in (400, 413)
    assert wait_for(lambda: server.log_file.read_text().count("rejected: 4") >= 4)
    log = server.log_file.read_text()
    assert "Traceback" not in log and "Invoking custom service failed" not in log


def test_requests_add_access_log_lines_but_no_server_log_lines(
    server: serve.Instance, model: serve.Client, test_split: Split
) -> None:
    body = first_pngs(test_split, 1)[0]
    access_log = server.log_dir / "access_log.log"

    def lines(path: Path) -> int:
        return path.read_text().count("\n")

    model.predict(body)
    assert wait_for(lambda: "/predictions/" in access_log.read_text())
    before_server, before_access = lines(server.log_file), lines(access_log)
    for _ in range(20):
        assert model.predict(body).status_code == 200
    assert wait_for(lambda: lines(access_log) >= before_access + 20)
    assert lines(server.log_file) == before_server


# --- parity ---------------------------------------------------------------------------------------


def test_served_classes_match_offline_evaluation_on_the_whole_test_set(
    model: serve.Client, export_dir: Path, test_split: Split, capsys: pytest.CaptureFixture[str]
) -> None:
    bodies = first_pngs(test_split, len(test_split))
    offline = offline_probabilities(export_dir, bodies).argmax(1)
    start = time.monotonic()
    answers = post_concurrently(predictions_url(model), bodies, inference_headers(model, top_k=1), clients=16)
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


# --- command line -------------------------------------------------------------------------------


def test_status_command_runs_as_a_module(server: serve.Instance, model: serve.Client) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "scripts.serve", *cli(server, "status")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Healthy" in done.stdout and f"{MODEL} " in done.stdout and "1/1 workers ready" in done.stdout


def test_predict_command_prints_a_top_k_table(
    server: serve.Instance,
    model: serve.Client,
    export_dir: Path,
    test_split: Split,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bodies = first_pngs(test_split, 3)
    classes = json.loads((export_dir / "model_meta.json").read_text())["classes"]
    files = []
    for i, body in enumerate(bodies):  # named like `training.data --samples` names them
        files.append(tmp_path / f"test{i:05d}_{serve.label_slug(classes[test_split.labels[i]])}.png")
        files[-1].write_bytes(body)
    expected = [classes[i] for i in offline_probabilities(export_dir, bodies).argmax(1).tolist()]
    truth = [serve.label_slug(classes[label]) for label in test_split.labels[:3].tolist()]
    argv = cli(server, "predict", str(tmp_path), "--top-k", "2", "--truth-from-name")
    assert serve.main(argv) == 0
    header, *rows, summary = capsys.readouterr().out.splitlines()
    # Columns are separated by 2+ spaces; a cell is "<label> <probability>" (labels may hold a space).
    cells = [re.split(r"\s{2,}", line) for line in [header, *rows]]
    assert cells[0] == ["image", "truth", "top-1 ok", "top-1", "top-2"]
    assert [row[:2] for row in cells[1:]] == [[str(f), t] for f, t in zip(files, truth, strict=True)]
    assert [row[3].rsplit(" ", 1)[0] for row in cells[1:]] == expected
    hits = sum(serve.label_slug(e) == t for e, t in zip(expected, truth, strict=True))
    assert summary == f"{hits} of 3 top-1 predictions match the label in the file name"


@pytest.mark.parametrize(
    "command",
    [["status"], ["register"], ["unregister"], ["scale", "--min-workers", "1", "--max-workers", "1"]],
    ids=["status", "register", "unregister", "scale"],
)
def test_commands_explain_a_server_that_is_not_running(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve.main(cli(serve.Instance("never-started", tmp_path), *command)) == 1
    err = capsys.readouterr().err
    assert "is not running" in err and "python -m scripts.serve start" in err and "Traceback" not in err


def test_predict_explains_an_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.png").write_bytes(png_bytes(np.zeros((28, 28), dtype=np.uint8)))
    port = serve.free_ports(1)[0]
    argv = ["--inference-url", f"http://127.0.0.1:{port}", "predict", str(tmp_path / "x.png")]
    assert serve.main(argv) == 1
    assert f"no TorchServe answers at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_predict_explains_a_wrong_key(
    server: serve.Instance, model: serve.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = json.loads(server.key_file.read_text())
    keys["inference"]["key"] = "wrong"
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    (tmp_path / "x.png").write_bytes(png_bytes(np.zeros((28, 28), dtype=np.uint8)))
    argv = cli(server, "--key-file", str(tmp_path / "keys.json"), "predict", str(tmp_path / "x.png"))
    assert serve.main(argv) == 1
    assert "refused the inference key" in capsys.readouterr().err


def test_predict_explains_a_model_that_is_not_registered(
    server: serve.Instance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.png").write_bytes(png_bytes(np.zeros((28, 28), dtype=np.uint8)))
    assert serve.main(cli(server, "predict", str(tmp_path / "x.png"))) == 1
    assert "is not registered: run `python -m scripts.serve register`" in capsys.readouterr().err


@pytest.mark.parametrize("archive", ["missing.mar", "http://127.0.0.1:1/fashion_mnist.mar"])
def test_register_explains_an_archive_outside_the_store(
    server: serve.Instance, archive: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve.main(cli(server, "register", archive)) == 1
    assert "registration refused" in capsys.readouterr().err
