"""Drift monitoring end to end with real parts: TorchServe serving the project's archive, Prometheus
evaluating the rules generated from that archive's export, Alertmanager delivering to a webhook
receiver in this test. Short windows (seconds instead of minutes) keep it to about a minute.

The tests run in file order against one stack: clean traffic raises no model alert (and fills
the prediction log); shifted
traffic (inverted, darkened and noisy test images) fires InputDrift; killing the worker fires
WorkerRestarts; stopping the server fires TargetDown. Each alert must reach the receiver.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests

from handler.monitor import PREDICTION_PREFIX
from monitoring import rules
from monitoring.stack import Stack
from serving import MODEL_NAME
from serving.client import Client, RequestFailed
from serving.images import encode as png_bytes
from serving.loadgen import post_all as post_concurrently
from serving.server import (
    ANY_PORTS,
    Instance,
    free_ports,
    read_keys,
    read_record,
    server_process,
    start,
    stop,
)
from serving.waiting import wait_for
from training.data import load_split

# solo: the alerts must fire (or stay silent) within windows of seconds, on a 1 s scrape and evaluation.
pytestmark = [pytest.mark.serving, pytest.mark.solo]
WINDOWS = rules.Windows(drift="40s", rate="10s", hold="2s", target_down="2s", grace="15s", interval="1s")
MIN_REQUESTS = 150
IMAGES = 300
MODEL_ALERTS = {"InputDrift", "PredictionMixShift", "LowConfidence"}
DASHBOARD = Path(__file__).resolve().parent.parent / "monitoring" / "grafana" / "fashion-mnist.json"


class Receiver(ThreadingHTTPServer):
    """Collects Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.notifications: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/alerts"

    def firing(self) -> set[str]:
        return {
            a["labels"]["alertname"]
            for n in list(self.notifications)
            for a in n["alerts"]
            if a["status"] == "firing"
        }


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.notifications.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mar_file: Path) -> Iterator[Instance]:
    instance = Instance("drift", tmp_path_factory.mktemp("serve"))
    start(instance, mar_file.parent, ANY_PORTS)
    client = Client.for_instance(instance)
    try:
        client.register()
        yield instance
    finally:
        client.close()
        stop(instance)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, server: Instance, mar_file: Path, receiver: Receiver
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("monitor")
    rules.write(
        mar_file,  # the served version: an int8 archive's is the export's plus "-int8"
        work / "rules.yml",
        WINDOWS,
        rules.Thresholds(min_requests=MIN_REQUESTS),
        job="torchserve",
        gke=None,
    )
    target = read_record(server).url("metrics").removeprefix("http://")
    ports = free_ports(2)
    monitor = Stack(work, ports[0], ports[1])
    monitor.start([target], work / "rules.yml", scrape_interval="1s", webhook=receiver.url, group_wait="1s")
    yield monitor
    monitor.stop()


def query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    body = requests.get(f"{stack.prometheus_url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def send(server: Instance, images: np.ndarray) -> None:
    record = read_record(server)
    key = read_keys(server.key_file)["inference"]["key"]
    url = f"{record.url('inference')}/predictions/{MODEL_NAME}"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    answers = post_concurrently(url, [png_bytes(image) for image in images], headers, clients=4)
    assert [status for status, _ in answers] == [200] * len(images)


@pytest.fixture(scope="module")
def test_images(real_data_root: Path) -> np.ndarray:
    return load_split(real_data_root, "test").images[: 2 * IMAGES].numpy()


def shifted(images: np.ndarray) -> np.ndarray:
    """A third each: inverted (white background), darkened to 40%, and heavy Gaussian noise."""
    rng = np.random.default_rng(0)
    parts = np.array_split(images.astype(np.float64), 3)
    noisy = parts[2] + rng.normal(0, 80, parts[2].shape)
    out = np.concatenate([255 - parts[0], parts[1] * 0.4, noisy])
    return np.clip(out, 0, 255).astype(np.uint8)


def test_clean_traffic_raises_no_model_alert(
    stack: Stack, server: Instance, receiver: Receiver, test_images: np.ndarray
) -> None:
    assert wait_for(lambda: query(stack, 'up{job="torchserve"} == 1'), timeout=60, interval=0.5), "no scrape"
    send(server, test_images[:IMAGES])
    enough = f"fashion:requests:window >= {MIN_REQUESTS}"
    assert wait_for(lambda: query(stack, enough), timeout=60, interval=0.5), (
        "Prometheus never saw the traffic"
    )
    psi = wait_for(
        lambda: len(r := query(stack, "fashion:input_psi:window")) == 3 and r, timeout=30, interval=0.5
    )
    assert psi, "PSI was never recorded for the three input features"
    # Eight rule evaluations with the clean traffic in the window: four times the alerts' `for`.
    evaluations: set[float] = set()

    def clean_evaluation() -> bool:
        values = {
            r["metric"]["feature"]: float(r["value"][1]) for r in query(stack, "fashion:input_psi:window")
        }
        assert max(values.values()) < rules.Thresholds.psi, f"clean traffic drifted: PSI {values}"
        alerts = {r["metric"]["alertname"] for r in query(stack, "ALERTS")}
        assert not alerts & MODEL_ALERTS, f"model alerts on clean traffic: {alerts}"
        evaluations.update(float(r["value"][1]) for r in query(stack, "timestamp(fashion:input_psi:window)"))
        return len(evaluations) >= 8

    assert wait_for(clean_evaluation, timeout=60, interval=0.25), f"only {len(evaluations)} rule evaluations"
    assert not receiver.firing() & MODEL_ALERTS


def test_prediction_log_has_one_json_line_per_answer(server: Instance) -> None:
    """log4j2 routes the handler's prediction lines to predictions.log, and only there."""
    log = server.log_dir / "predictions.log"
    lines = wait_for(
        lambda: len(t := log.read_text().splitlines()) >= IMAGES and t, timeout=30, interval=0.25
    )
    assert lines, f"{log} has fewer than {IMAGES} lines"
    entries = [json.loads(line) for line in lines]
    assert {e["event"] for e in entries} == {"prediction"}
    assert len({e["request_id"] for e in entries}) == len(entries)
    assert PREDICTION_PREFIX not in server.log_file.read_text()


def test_shifted_traffic_fires_input_drift(
    server: Instance, stack: Stack, receiver: Receiver, test_images
) -> None:
    send(server, shifted(test_images[IMAGES:]))
    fired = wait_for(lambda: "InputDrift" in receiver.firing(), timeout=90, interval=0.5)
    psi = {r["metric"]["feature"]: float(r["value"][1]) for r in query(stack, "fashion:input_psi:window")}
    assert fired, f"InputDrift never reached the receiver; PSI now {psi}"
    drifted = {a["labels"]["feature"] for n in receiver.notifications for a in n["alerts"]
               if a["labels"]["alertname"] == "InputDrift"}  # fmt: skip
    assert drifted, "InputDrift notifications carry no feature label"


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_dashboard_query_returns_data(server: Instance, stack: Stack) -> None:
    """Each PromQL expression of the Grafana dashboard parses and returns series (Grafana's own
    interval variables replaced by what Grafana would put there for this 1 s scrape)."""
    client = Client.for_instance(server)
    with pytest.raises(RequestFailed) as refused:  # so the rejected-inputs panel has data
        client.predict(b"not an image")
    assert refused.value.status == 400
    client.close()
    queries = dashboard_queries()
    assert len(queries) >= 15
    grafana = {"$__rate_interval": "10s", "$__range": "5m"}
    missing: list[str] = []

    def all_return_data() -> bool:
        exprs = [functools.reduce(lambda e, kv: e.replace(*kv), grafana.items(), expr) for expr in queries]
        missing[:] = [expr for expr in exprs if not query(stack, expr)]  # query() fails on a parse error
        return not missing

    assert wait_for(all_return_data, timeout=30, interval=1), f"dashboard queries without data: {missing}"


def test_killed_worker_fires_worker_restarts(server: Instance, stack: Stack, receiver: Receiver) -> None:
    jvm = server_process(read_record(server))
    workers = [p for p in jvm.children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())]
    assert workers, "no TorchServe worker process found"
    # Past the rules' grace period, so the first start is not taken for a restart.
    assert wait_for(lambda: query(stack, "fashion_worker_starts offset 15s"), timeout=60, interval=0.5)
    workers[0].kill()
    psutil.wait_procs(workers[:1], timeout=30)
    fired = wait_for(lambda: "WorkerRestarts" in receiver.firing(), timeout=90, interval=0.5)
    assert fired, (
        f"WorkerRestarts never reached the receiver; starts: {query(stack, 'fashion_worker_starts')}"
    )


def test_stopped_server_fires_target_down(server: Instance, stack: Stack, receiver: Receiver) -> None:
    assert "TargetDown" not in receiver.firing()
    stop(server)
    fired = wait_for(lambda: "TargetDown" in receiver.firing(), timeout=90, interval=0.5)
    assert fired, f"TargetDown never reached the receiver; up = {query(stack, 'up')}"
