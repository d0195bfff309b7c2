"""Faults against a real TorchServe: a worker killed under load, a server restarted, corrupt archives,
and (with Docker) the container stopped while loaded.

    python -m pytest tests/test_faults.py -q
    python -m pytest tests/test_faults.py -q -m container     # only the container fault (needs Docker)

Load comes from the repository's own load generator (serving.loadgen.drive): keep-alive clients
sending back to back, every request's outcome recorded. docs/reliability.md has the measured
behaviour of each fault.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from archive.build import ServingConfig
from serving import MODEL_NAME as MODEL
from serving import REPO
from serving.client import Client, RequestFailed
from serving.container import hardened_flags
from serving.images import noise_pngs
from serving.loadgen import Sample, drive
from serving.server import DEFAULT_PORTS, Instance, read_record, stop
from serving.waiting import wait_for
from tests.containers import Container, build_image
from tests.live_server import offline_probabilities
from tests.reliability import (
    PREDICT_PATH,
    RandomArchive,
    random_archive,
    serving_store_copy,
    worker_pids,
)

PROBE = "probe"  # corrupt archives are registered under this name, beside the healthy model
BATCH_SIZE = 8
CLIENTS = 8
BODIES = noise_pngs(32)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> RandomArchive:
    # One worker (the archive's default is two): a kill then takes out the only one, so the failed
    # batch, the restart and the gap in service are each observable and countable.
    return random_archive(tmp_path_factory, ServingConfig(min_workers=1, max_workers=1))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, archive: RandomArchive) -> Iterator[Instance]:
    """A server with the model registered (batch_size 8, one worker) and a store tests may add to."""
    with serving_store_copy(tmp_path_factory, archive, "faults", batch_size=BATCH_SIZE) as instance:
        assert len(worker_pids(Client.for_instance(instance))) == 1
        yield instance


@pytest.fixture
def client(server: Instance) -> Client:
    return Client.for_instance(server)


class Load:
    """serving.loadgen.drive in a background thread: `clients` closed-loop clients until stopped."""

    def __init__(self, url: str, headers: dict[str, str], clients: int = CLIENTS) -> None:
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=drive,
            args=(url, headers, BODIES, clients, 600),
            kwargs={"stop": self.stop, "sink": self.samples},
        )
        self.thread.start()

    def answered(self, since: float = 0.0, status: int = 200) -> int:
        return sum(s.due >= since and s.status == status for s in list(self.samples))

    def finish(self) -> list[Sample]:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "a client hung"
        return sorted(self.samples, key=lambda s: s.due)


def load_on(url: str, key: str, clients: int = CLIENTS) -> Load:
    return Load(url, {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}, clients)


def predicts_like_offline(client: Client, archive: RandomArchive) -> bool:
    expected = int(offline_probabilities(archive.export, BODIES[:1])[0].argmax())
    try:
        return client.predict(BODIES[0], top_k=1).predictions[0].index == expected
    except RequestFailed:
        return False


# --- a worker killed under load ----------------------------------------------------------------------


@pytest.mark.serving
@pytest.mark.solo  # "at most one batch fails" holds for the load it drives, not on a shared machine
def test_worker_killed_under_load_is_restarted_and_only_its_batch_fails(
    server: Instance, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    (old_pid,) = worker_pids(client).values()
    load = load_on(client.urls["inference"] + PREDICT_PATH, client.key("inference"))
    try:
        wait_for(lambda: load.answered() >= 200, 30, "load to reach the server")
        killed_at = time.perf_counter()
        os.kill(old_pid, signal.SIGKILL)
        wait_for(
            lambda: set(worker_pids(client).values()) - {old_pid},
            120,
            "a new worker to replace the killed one",
        )
        ready_at = time.perf_counter()
        wait_for(
            lambda: load.answered(since=ready_at) >= 200, 60, "200 answers after the new worker was ready"
        )
    finally:
        samples = load.finish()

    failed = [s for s in samples if s.status != 200]
    with capsys.disabled():
        print(
            f"\nkill -9 of worker {old_pid} under {CLIENTS} clients: {len(samples)} requests, "
            f"{len(failed)} failed ({sorted({(s.status, s.error) for s in failed})}); "
            f"new worker READY after {ready_at - killed_at:.1f} s"
        )
    # Exactly the batch the worker held when it died fails: under constant load the frontend
    # always has jobs waiting for the worker, so at least one request and at most one batch, all
    # sent before the replacement was ready; every request after that succeeded.
    assert 1 <= len(failed) <= BATCH_SIZE, failed
    assert all(s.due < ready_at for s in failed), failed
    assert [s for s in samples if s.due >= ready_at and s.status != 200] == []
    # TorchServe answers them {"type": "InternalServerException", "message": "Worker died."} with
    # 507 or 500: the status depends on where its worker thread notices the death.
    assert {s.status for s in failed} <= {500, 507}, "a failed request got no clean HTTP error"
    assert client.ping() == {"status": "Healthy"}


# --- a server restarted ------------------------------------------------------------------------------


def cli(instance: Instance, *args: str) -> subprocess.CompletedProcess[str]:
    """One documented `python -m scripts.serve` command for this instance, on free ports."""
    env = os.environ | {f"FASHION_SERVE_{name.upper()}_PORT": "0" for name in DEFAULT_PORTS}
    command = [sys.executable, "-m", "scripts.serve", "--state-dir", str(instance.state_root)]
    return subprocess.run(
        [*command, "--instance", instance.name, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )


def serve_and_predict(instance: Instance, store: Path, image: Path) -> None:
    """The documented sequence: start, register, predict."""
    for args in (["start", "--model-store", str(store)], ["register"], ["predict", str(image)]):
        done = cli(instance, *args)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}{done.stderr}"


@pytest.mark.serving
@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_restart_on_the_same_store_serves_again_with_the_documented_commands(
    archive: RandomArchive, tmp_path: Path, how: str
) -> None:
    instance = Instance("restart", tmp_path / "state")
    image = tmp_path / "shirt.png"
    image.write_bytes(BODIES[0])
    try:
        serve_and_predict(instance, archive.store, image)
        first = read_record(instance)
        if how == "stopped":
            assert cli(instance, "stop").returncode == 0
        else:  # a crash: the JVM and its workers die at once, leaving PID file, keys and sockets behind
            jvm = psutil.Process(first.pid)
            family = [jvm, *jvm.children(recursive=True)]
            for proc in family:
                proc.kill()
            psutil.wait_procs(family, timeout=30)
        serve_and_predict(instance, archive.store, image)
        assert read_record(instance).pid != first.pid
    finally:
        stop(instance)


# --- corrupt archives --------------------------------------------------------------------------------


def truncated(mar: bytes) -> bytes:
    return mar[: len(mar) // 2]


def altered(mar: bytes) -> bytes:
    """64 bytes inside the compressed model flipped: the zip's checksum no longer matches."""
    with zipfile.ZipFile(io.BytesIO(mar)) as archive:
        info = archive.getinfo("model.pt")
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    changed = bytearray(mar)
    for i in range(data_start + info.compress_size // 2, data_start + info.compress_size // 2 + 64):
        changed[i] ^= 0x5A
    return bytes(changed)


def model_replaced(mar: bytes) -> bytes:
    """A well-formed zip whose model.pt is not a TorchScript file (a consistent but wrong edit)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(mar)) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            target.writestr(
                item, b"not a model" if item.filename == "model.pt" else source.read(item.filename)
            )
    return out.getvalue()


# kind -> (how the store's good archive is damaged, how TorchServe's refusal begins)
CORRUPT = {
    "truncated": (truncated, "Failed to save model: {name}"),
    "altered-bytes": (altered, "Failed to save model: {name}"),
    "not-a-zip": (lambda mar: b"this is not a model archive\n", f"Failed to start workers for model {PROBE}"),
    "model-file-replaced": (model_replaced, f"Failed to start workers for model {PROBE}"),
}


def probe_serving(client: Client) -> bool:
    return any(entry["modelName"] == PROBE for entry in client.models()) and bool(worker_pids(client, PROBE))


@pytest.mark.serving
@pytest.mark.parametrize("kind", CORRUPT)
def test_corrupt_archive_is_refused_and_the_registered_model_keeps_serving(
    server: Instance, client: Client, archive: RandomArchive, kind: str
) -> None:
    damage, refusal = CORRUPT[kind]
    store = Path(read_record(server).model_store)
    name = f"{kind}.mar"
    (store / name).write_bytes(damage((store / f"{MODEL}.mar").read_bytes()))
    pids = worker_pids(client)
    try:
        params = {"url": name, "model_name": PROBE, "synchronous": "true"}
        resp = client.call("management", "POST", "/models", params=params)
        assert resp.status_code == 500, resp.text
        assert resp.json()["message"].startswith(refusal.format(name=name)), resp.text
        assert not probe_serving(client)
        assert worker_pids(client) == pids and predicts_like_offline(client, archive)
    finally:
        if any(entry["modelName"] == PROBE for entry in client.models()):
            client.unregister(PROBE)
        (store / name).unlink()


# --- the container stopped under load ----------------------------------------------------------------

RUNTIME_IMAGE = "fashion-mnist-serve:test-runtime"  # the image tests/test_container.py builds too
CONTAINER_STORE = "/opt/fashion-serve/model-store"
GRACE_S = 10  # docker stop's default, and what the image is built to stop within
DRAIN_CLIENTS = 16
# A request sent after the stop is answered, or refused at once: 400 InvalidKeyException (the
# drain renewed the inference key), 503 (no worker left), or the connection refused or closed
# before any byte of an answer.
REFUSED_STATUSES = {400, 503}
CONNECTION_ERRORS = {
    "RemoteDisconnected",
    "ConnectionResetError",
    "BrokenPipeError",
    "ConnectionRefusedError",
}


@pytest.mark.container
@pytest.mark.solo  # 16 clients' latencies and the exit must stay inside the 10 s grace period
def test_docker_stop_drains_the_requests_in_flight(
    archive: RandomArchive, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docker/serve.sh drains on SIGTERM (docker/drain.py): with 16 clients mid-request, every
    request sent before `docker stop` gets 200 and every later one is answered or refused at once."""
    image = build_image(RUNTIME_IMAGE, target="runtime")
    store = tmp_path / "model_store"
    store.mkdir(mode=0o755)
    shutil.copyfile(archive.store / f"{MODEL}.mar", store / f"{MODEL}.mar")
    (store / f"{MODEL}.mar").chmod(0o644)  # the container's user must read the mounted store
    publish = "--publish=127.0.0.1::8080"
    container = Container.run(
        image, flags=[*hardened_flags(), publish, f"--volume={store}:{CONTAINER_STORE}:ro"]
    )
    try:
        container.wait_healthy()
        keys = container.exec("cat", "key_file.json")
        assert keys.returncode == 0, keys.stderr
        url = f"http://127.0.0.1:{container.host_port(8080)}{PREDICT_PATH}"
        load = load_on(url, json.loads(keys.stdout)["inference"]["key"], DRAIN_CLIENTS)
        try:
            wait_for(lambda: load.answered() >= 200, 30, "load to reach the container")
            stop_at = time.perf_counter()
            exit_code, seconds = container.stop(GRACE_S)  # returns once the container has exited
        finally:
            samples = load.finish()
        logs = container.logs()
    finally:
        container.remove()

    before = [s for s in samples if s.due < stop_at]
    in_flight = [s for s in before if s.due + s.latency > stop_at]
    after = [s for s in samples if s.due >= stop_at]
    with capsys.disabled():
        print(
            f"\ndocker stop under {DRAIN_CLIENTS} clients: exit {exit_code} after {seconds:.1f} s; "
            f"{len(in_flight)} requests in flight, all answered {Counter(s.status for s in in_flight)}; "
            f"after the stop: {Counter(s.error or s.status for s in after)}"
        )
    assert exit_code == 0 and seconds < GRACE_S, logs[-3000:]
    assert f"drain.py: {MODEL} drained" in logs, logs[-3000:]
    # The clients are closed-loop, so nearly all of them had a request out when the signal came.
    assert len(in_flight) >= DRAIN_CLIENTS // 2, f"only {len(in_flight)} requests were in flight"
    assert [s for s in before if s.status != 200] == [], Counter(s.error or s.status for s in before)
    # Never a hang or a half answer: an answer, or a refusal that came at once.
    refused = [s for s in after if s.status != 200]
    assert max(s.latency for s in samples) < GRACE_S
    assert all(s.status in REFUSED_STATUSES or s.error in CONNECTION_ERRORS for s in refused), Counter(
        s.error or s.status for s in refused
    )
    assert max((s.latency for s in refused), default=0) < 1.0
