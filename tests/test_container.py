"""The serving image with a real Docker engine: built by scripts/build_image.sh, run hardened as
GKE runs it, predicting the same as the exported model offline, stopping cleanly on SIGTERM.

    python -m pytest tests/test_container.py          # builds the image (about 5 min cold, cached after)

The engine is started by scripts/ensure_dockerd.sh when none answers. Every container is
published on 127.0.0.1 only and removed in teardown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.monitor import PREDICTION_PREFIX
from serving.images import encode as png_bytes
from serving.waiting import wait_for
from tests.containers import REPO, Container, build_image, docker, hardened_flags, http
from tests.live_server import offline_probabilities
from training.data import DEBIAN_DIR, load_split

IMAGE = "fashion-mnist-serve:test"
RUNTIME_IMAGE = "fashion-mnist-serve:test-runtime"
TRAIN_IMAGE = "fashion-mnist-train:test"
STORE = "/opt/fashion-serve/model-store"
MODEL_URL = "http://127.0.0.1:{port}/predictions/fashion_mnist"
# docker stop's default grace period, and the bound the issue sets: 1.5 GB.
GRACE_S = 10
MAX_IMAGE_BYTES = 1_500_000_000
PUBLISH = ["--publish=127.0.0.1::8080", "--publish=127.0.0.1::8081", "--publish=127.0.0.1::8082"]
BLANK_PNG = png_bytes(np.zeros((28, 28), dtype=np.uint8))


@pytest.fixture(scope="module")
def image(mar_file: Path) -> str:
    return build_image(IMAGE, mar=mar_file)


@pytest.fixture(scope="module")
def runtime_image() -> str:
    return build_image(RUNTIME_IMAGE, target="runtime")


@pytest.fixture(scope="module")
def hardened(image: str) -> Iterator[Container]:
    """The baked image, run with GKE's hardening and a memory limit, once healthy."""
    container = Container.run(image, flags=[*hardened_flags(), *PUBLISH])
    try:
        container.wait_healthy()
        yield container
    finally:
        container.remove()


def inference_key(container: Container) -> str:
    """The documented way: `docker exec <c> cat key_file.json` (TorchServe's working directory)."""
    proc = container.exec("cat", "key_file.json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["inference"]["key"]


def predict(container: Container, body: bytes, key: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/octet-stream"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return http("POST", MODEL_URL.format(port=container.host_port(8080)), body, headers)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--target", "debug"], 2, "--target must be 'serve' (archive inside) or 'runtime'"),
        (["--mar", "missing/fashion_mnist.mar"], 1, "build it with 'python -m archive.build'"),
    ],
    ids=["bad-target", "no-archive"],
)
def test_build_script_refuses_bad_arguments_before_building(args: list[str], code: int, message: str) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "build_image.sh"), *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == code and message in proc.stderr, proc.stderr


def torch_layer_instructions(dockerfile: str) -> list[str]:
    """The venv stage's instructions up to torch's install: continuation lines joined, comments dropped."""
    lines = (REPO / dockerfile).read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    start = lines.index("FROM debian:bookworm-slim AS venv")
    stage = [line for line in lines[start:] if line.strip() and not line.startswith("#")]
    end = next(i for i, line in enumerate(stage) if line.startswith("RUN") and line.endswith(" torch"))
    return stage[: end + 1]


def test_both_images_build_the_same_torch_layer() -> None:
    """The image built second finds torch's layer cached only if every instruction up to it matches."""
    serving = torch_layer_instructions("Dockerfile")
    assert serving == torch_layer_instructions("Dockerfile.train")
    assert serving[-1] == 'RUN /tmp/wheels/install_venv.sh "$WHEELS" /tmp/wheels/requirements.txt torch'
    # Read from the serving pins, torch must be the training image's too, or its second install replaces it.
    pins = [
        [line for line in (REPO / "docker" / name).read_text().splitlines() if line.startswith("torch==")]
        for name in ("requirements.txt", "requirements-train.txt")
    ]
    assert pins[0] == pins[1] and len(pins[0]) == 1, pins


def test_venv_install_refuses_a_package_the_requirements_do_not_pin(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy==2.4.6\n")
    proc = subprocess.run(
        ["sh", str(REPO / "docker" / "install_venv.sh"), "local", str(requirements), "torch"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2 and f"{requirements} pins no 'torch'" in proc.stderr, proc.stderr


@pytest.mark.container
def test_image_fits_the_size_budget(image: str) -> None:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size <= MAX_IMAGE_BYTES, f"{image} is {size / 1e9:.2f} GB, over {MAX_IMAGE_BYTES / 1e9} GB"


@pytest.mark.container
@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("User", "10001:10001"),
        ("ExposedPorts", {f"{port}/tcp": {} for port in (8080, 8081, 8082, 7070, 7071)}),
        ("Entrypoint", ["/usr/bin/tini", "--"]),
    ],
)
def test_image_config(image: str, field: str, expected: object) -> None:
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config[field] == expected


@pytest.mark.container
def test_image_has_a_healthcheck(image: str) -> None:
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["Healthcheck"]["Test"] == ["CMD", "python3", "/opt/fashion-serve/healthcheck.py"]


@pytest.mark.container
def test_healthcheck_fails_without_a_server(image: str) -> None:
    proc = docker(
        "run", "--rm", *hardened_flags(), image, "python3", "/opt/fashion-serve/healthcheck.py", check=False
    )
    assert proc.returncode == 1
    assert "unhealthy: key_file.json not found" in proc.stderr


@pytest.mark.container
def test_hardened_container_becomes_healthy(hardened: Container) -> None:
    host = hardened.inspect()["HostConfig"]
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"], host
    assert "no-new-privileges" in host["SecurityOpt"] and host["Memory"] == 2**30
    assert hardened.health() == "healthy"


@pytest.mark.container
def test_predictions_match_offline_evaluation_of_the_archive(
    hardened: Container, served_model_dir: Path, real_data_root: Path
) -> None:
    """The image's torch (older than training's) answers like this one on the archive's own files."""
    split = load_split(real_data_root, "test")
    bodies = [png_bytes(image) for image in split.images[:24].numpy()]
    offline = offline_probabilities(served_model_dir, bodies)
    key = inference_key(hardened)
    for body, expected in zip(bodies, offline, strict=True):
        status, payload = predict(hardened, body, key)
        assert status == 200, payload
        predictions = json.loads(payload)["predictions"]
        assert predictions[0]["index"] == int(expected.argmax())
        served = torch.tensor([p["probability"] for p in predictions])
        torch.testing.assert_close(served, expected[[p["index"] for p in predictions]], atol=1e-4, rtol=0)


@pytest.mark.container
@pytest.mark.parametrize("key", [None, "not-the-key"])
def test_prediction_without_the_key_is_refused(hardened: Container, key: str | None) -> None:
    status, payload = predict(hardened, BLANK_PNG, key)
    # TorchServe answers a missing or wrong key with 400 InvalidKeyException (it has no 401).
    assert status == 400 and json.loads(payload)["type"] == "InvalidKeyException"


@pytest.mark.container
def test_logs_go_to_stdout_not_files(hardened: Container) -> None:
    predict(hardened, BLANK_PNG, inference_key(hardened))
    assert '"POST /predictions/fashion_mnist HTTP/1.1" 200' in hardened.logs()

    # The prediction log: bare JSON lines on stdout, which Cloud Logging stores as jsonPayload.
    def predictions() -> list[str]:  # the worker's stdout reaches the log a moment after the answer
        return [line for line in hardened.logs().splitlines() if line.startswith(PREDICTION_PREFIX)]

    lines = wait_for(lambda: predictions() or None, 30, "a prediction-log line on stdout")
    assert lines and json.loads(lines[-1])["model"] == "fashion_mnist", hardened.logs()[-2000:]
    written = hardened.exec("find", "/tmp", "/home/model-server", "-name", "*.log").stdout
    assert written == "", f"log files inside the container: {written}"


@pytest.mark.container
@pytest.mark.solo  # the stop must finish inside the 10 s grace period
def test_docker_stop_exits_zero_within_the_grace_period(image: str) -> None:
    container = Container.run(image, flags=[*hardened_flags(), *PUBLISH])
    try:
        container.wait_healthy()
        code, seconds = container.stop(GRACE_S)
        assert code == 0, container.logs()[-2000:]
        assert seconds < GRACE_S, f"stop took {seconds:.1f} s, so SIGKILL ended it"
        assert "serve.sh: TorchServe stopped" in container.logs()
    finally:
        container.remove()


@pytest.mark.container
def test_mounted_model_store_serves(runtime_image: str, mar_file: Path, tmp_path: Path) -> None:
    # The container's user (uid 10001) must be able to read the mounted store.
    store = tmp_path / "model_store"
    store.mkdir(mode=0o755)
    shutil.copy(mar_file, store / "fashion_mnist.mar")
    (store / "fashion_mnist.mar").chmod(0o644)
    container = Container.run(
        runtime_image, flags=[*hardened_flags(), *PUBLISH, f"--volume={store}:{STORE}:ro"]
    )
    try:
        container.wait_healthy()
        status, payload = predict(container, BLANK_PNG, inference_key(container))
        assert status == 200, payload
    finally:
        container.remove()


@pytest.mark.container
def test_runtime_image_without_an_archive_says_how_to_provide_one(runtime_image: str) -> None:
    container = Container.run(runtime_image, flags=hardened_flags())
    try:
        assert container.wait_exit() == 2
        logs = container.logs()
        assert f"{STORE}/fashion_mnist.mar not found" in logs and "python -m archive.build" in logs, logs
    finally:
        container.remove()


@pytest.mark.container
def test_training_image_runs_the_pipeline_hardened(tmp_path: Path) -> None:
    """Dockerfile.train trains, exports and evaluates on the mounted dataset, into mounted volumes."""
    if not DEBIAN_DIR.is_dir():
        pytest.fail(f"{DEBIAN_DIR} is empty: run `scripts/setup.sh` (installs dataset-fashion-mnist)")
    image = build_image(TRAIN_IMAGE, train=True)
    data, outputs = tmp_path / "data", tmp_path / "outputs"
    for volume in (data, outputs):
        volume.mkdir()
        volume.chmod(0o777)  # the image's user, uid 10001, writes here
    flags = [
        *hardened_flags("2g", ("/tmp",)),
        f"--volume={DEBIAN_DIR}:/app/raw:ro",
        f"--volume={data}:/app/data",
        f"--volume={outputs}:/app/outputs",
    ]
    steps = [
        ["training.train", "experiment=smoke", "data.root=/app/data", "data.source_dir=/app/raw"],
        [
            "training.export",
            "--run",
            "/app/outputs/train/latest",
            "--out",
            "/app/outputs/model",
            "--data",
            "/app/data",
        ],
        [
            "training.evaluate",
            "--model-dir",
            "/app/outputs/model",
            "--out",
            "/app/outputs/reports",
            "--data",
            "/app/data",
        ],
    ]
    for args in steps:
        container = Container.run(image, *args, flags=flags)
        try:
            assert container.wait_exit(timeout=300) == 0, container.logs()[-3000:]
        finally:
            container.remove()
    assert (outputs / "train" / "latest" / "checkpoints" / "best.ckpt").is_file()
    assert (outputs / "model" / "model.pt").is_file() and (outputs / "model" / "model_meta.json").is_file()
    report = json.loads((outputs / "reports" / "metrics.json").read_text())
    meta = json.loads((outputs / "model" / "model_meta.json").read_text())
    assert report["num_examples"] == 10_000
    # Evaluation of the exported file agrees with the test accuracy export measured and recorded.
    assert report["accuracy"] == pytest.approx(meta["metrics"]["test_accuracy"], abs=1e-4), (report, meta)
