"""The pod of the rendered Kubernetes manifests, run with a real Docker engine as the kubelet would:
its probes answer, readiness follows TorchServe, and a deletion drains cleanly.

    python -m pytest tests/test_deploy_pod.py        # builds the serving image once (needs Docker)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from checks.manifests import render
from serving.images import encode
from serving.waiting import wait_for
from tests.containers import Pod, build_image, http

IMAGE = "fashion-mnist-serve:test"
# solo: each probe runs once against its timeoutSeconds, and the deletion must drain inside the grace
# period; on a machine shared with other tests both would measure the load, not the manifests.
pytestmark = pytest.mark.solo


@pytest.fixture(scope="module")
def gke() -> list[dict[str, Any]]:
    return render("overlays/gke")


@pytest.fixture(scope="module")
def pod(gke: list[dict[str, Any]], mar_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    secrets = {"fashion-mnist-token": {"tokens": "0" * 64 + "\n"}}
    pod = Pod.run(gke, build_image(IMAGE, mar=mar_file), tmp_path_factory.mktemp("pod"), secrets)
    try:
        pod.wait_ready()
        yield pod
    finally:
        pod.remove()


@pytest.mark.container
@pytest.mark.parametrize("kind", ["startupProbe", "readinessProbe", "livenessProbe"])
@pytest.mark.parametrize("name", ["torchserve", "proxy"])
def test_manifest_probes_pass_on_the_running_pod(pod: Pod, name: str, kind: str) -> None:
    assert pod.probe(name, kind)


@pytest.mark.container
def test_readiness_follows_torchserve(pod: Pod) -> None:
    """The proxy's readiness path goes through to TorchServe: with TorchServe down it fails,
    while the proxy's liveness still passes (no restart of a healthy proxy)."""
    torchserve = pod.containers["torchserve"]
    torchserve.stop(30)
    try:
        assert not pod.probe("proxy", "readinessProbe")
        assert pod.probe("proxy", "livenessProbe")
    finally:
        # As the kubelet would: restart the container, so the pod is whole for the other tests.
        torchserve.start()
        pod.wait_ready()


@pytest.mark.container
def test_pod_deletion_drains_cleanly(
    gke: list[dict[str, Any]], mar_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Requests through the proxy keep succeeding until the proxy stops listening (TorchServe
    outlives it), and every container exits 0 inside terminationGracePeriodSeconds."""
    secrets = {"fashion-mnist-token": {"tokens": "1" * 64 + "\n"}}
    pod = Pod.run(gke, build_image(IMAGE, mar=mar_file), tmp_path_factory.mktemp("pod"), secrets)
    try:
        pod.wait_ready()
        url = f"http://127.0.0.1:{pod.port('http')}/predictions/fashion_mnist"
        body = encode(np.zeros((28, 28), dtype=np.uint8))
        headers = {"Authorization": f"Bearer {'1' * 64}", "Content-Type": "application/octet-stream"}
        # Ready means TorchServe's /ping, which says Healthy while the worker may still be loading;
        # http's default timeout covers a slow first answer on a loaded machine.
        wait_for(lambda: http("POST", url, body, headers)[0] == 200, 120, "a first prediction")
        answers: list[int] = []
        done = threading.Event()

        def client() -> None:
            while not done.is_set():
                try:
                    answers.append(http("POST", url, body, headers, timeout=5)[0])
                except OSError:
                    answers.append(0)  # refused or reset: the proxy is gone
                time.sleep(0.05)

        thread = threading.Thread(target=client)
        thread.start()
        try:
            exits = pod.terminate()
        finally:
            done.set()
            thread.join()
        grace = pod.spec["terminationGracePeriodSeconds"]
        for name, (code, seconds) in exits.items():
            assert code == 0 and seconds < grace, (name, code, seconds, pod.containers[name].logs()[-2000:])
        assert exits["torchserve"][1] > exits["proxy"][1]
        served = answers[: answers.index(0)] if 0 in answers else answers
        assert served and set(served) == {200}, answers
    finally:
        pod.remove()
