"""A real Prometheus scrapes the real TorchServe metrics port, as GKE's PodMonitoring would.

Checks that /metrics is valid Prometheus exposition text (`promtool check metrics`) and that the
request counter Prometheus stores goes up with the predictions we send.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from serving.client import Client
from serving.images import encode as png_bytes
from serving.server import Instance, read_record
from serving.waiting import wait_for
from tests.live_server import running_server
from training.data import load_split

pytestmark = pytest.mark.serving
PREDICTIONS = 12


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mar_file: Path) -> Iterator[Instance]:
    with running_server(mar_file.parent, tmp_path_factory.mktemp("serve"), "prom") as instance:
        yield instance


@pytest.fixture(scope="module")
def client(server: Instance) -> Iterator[Client]:
    client = Client.for_instance(server)
    client.register()
    yield client
    client.close()


@pytest.fixture(scope="module")
def metrics_url(server: Instance) -> str:
    return read_record(server).url("metrics")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, metrics_url: str) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `scripts/setup.sh --dev` (Debian package prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    target = metrics_url.removeprefix("http://")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: torchserve\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(work / "prometheus.log").open("w"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: _ok(f"{url}/-/ready"), 60, "prometheus to be ready", 0.25)
        except AssertionError as err:
            raise AssertionError(f"{err}: {(work / 'prometheus.log').read_text()[-2000:]}") from None
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def query(prometheus: str, expr: str) -> float | None:
    body = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5).json()
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_metrics_endpoint_is_valid_exposition_text(client: Client, metrics_url: str) -> None:
    client.predict(png_bytes(np.zeros((28, 28), np.uint8)))  # raises RequestFailed unless 200
    text = requests.get(f"{metrics_url}/metrics", timeout=10).text
    assert "ts_inference_requests_total" in text
    promtool = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    # promtool exits 1 when the text does not parse and 3 for naming advice only; TorchServe's own
    # metric names (CamelCase, microseconds) draw advice we cannot change.
    assert promtool.returncode in (0, 3), promtool.stderr
    assert "error while linting" not in promtool.stderr, promtool.stderr


def test_prometheus_scrapes_the_request_counter(
    client: Client, prometheus: str, real_data_root: Path
) -> None:
    wait_for(lambda: query(prometheus, 'up{job="torchserve"}') == 1.0, 60, "the scrape target to be up", 0.25)
    # Up means a scrape has happened: the counter is what the server reported then (absent before
    # any request).
    before = query(prometheus, "sum(ts_inference_requests_total)") or 0.0
    for image in load_split(real_data_root, "test").images[:PREDICTIONS].numpy():
        client.predict(png_bytes(image))  # raises RequestFailed unless 200
    total = "sum(ts_inference_requests_total)"
    wait_for(
        lambda: (query(prometheus, total) or 0.0) >= before + PREDICTIONS,
        60,
        f"Prometheus to see {PREDICTIONS} more requests than {before}",
        0.25,
    )
