"""The command line `python -m scripts.serve` against a real TorchServe JVM: every command run as a
user runs it (a subprocess), its output, its explanations and its exit status.

    python -m pytest -m serving tests/test_serving_cli.py

The module's server is started through the command line too, in a temporary state directory on
free ports (FASHION_SERVE_*_PORT=0), and always stopped in teardown.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from archive.build import ServingConfig
from serving import MODEL_NAME as MODEL
from serving import REPO
from serving.client import Client
from serving.images import encode
from serving.server import DEFAULT_PORTS, Instance, free_ports, running, stop
from tests.live_server import offline_probabilities
from training.data import load_split

pytestmark = pytest.mark.serving

FREE_PORTS = {f"FASHION_SERVE_{name.upper()}_PORT": "0" for name in DEFAULT_PORTS}


def serve_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """`python -m scripts.serve ARGS` as a user runs it; any free ports for `start`."""
    return subprocess.run(
        [sys.executable, "-m", "scripts.serve", *args],
        capture_output=True, text=True, cwd=cwd, env=os.environ | FREE_PORTS, timeout=300,
    )  # fmt: skip


def on(instance: Instance, *args: str) -> list[str]:
    return ["--state-dir", str(instance.state_root), "--instance", instance.name, *args]


def label_slug(label: str) -> str:
    """A class name as `training.data --samples` writes it into a file name."""
    return label.replace("/", "-").replace(" ", "-")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mar_file: Path) -> Iterator[Instance]:
    instance = Instance("cli", tmp_path_factory.mktemp("serve"))
    try:
        started = serve_cli(*on(instance, "start", "--model-store", str(mar_file.parent)))
        assert started.returncode == 0, started.stderr
        assert "is ready" in started.stdout and running(instance) is not None
        yield instance
    finally:
        stop(instance)


@pytest.fixture(scope="module")
def model(server: Instance) -> Iterator[Instance]:
    """The server with the model registered through `register`."""
    done = serve_cli(*on(server, "register"))
    assert done.returncode == 0, done.stderr
    try:
        yield server
    finally:
        Client.for_instance(server).unregister()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    path.write_bytes(encode(np.zeros((28, 28), dtype=np.uint8)))
    return path


def test_status_reports_health_and_workers(model: Instance) -> None:
    done = serve_cli(*on(model, "status"))
    assert done.returncode == 0, done.stderr
    workers = ServingConfig().min_workers  # the archive's default
    assert "Healthy" in done.stdout and f"{MODEL} " in done.stdout
    assert f"{workers}/{workers} workers ready" in done.stdout
    assert "(default)" in done.stdout, "status must mark the version /predictions serves"


def test_set_default_explains_a_version_that_is_not_registered(model: Instance) -> None:
    done = serve_cli(*on(model, "set-default", "0000deadbeef"))
    assert done.returncode == 1
    assert "`python -m scripts.serve status` lists the registered versions" in done.stderr


def test_predict_prints_a_top_k_table(
    model: Instance, served_model_dir: Path, real_data_root: Path, tmp_path: Path
) -> None:
    split = load_split(real_data_root, "test")
    bodies = [encode(pixels) for pixels in split.images[:3].numpy()]
    classes = json.loads((served_model_dir / "model_meta.json").read_text())["classes"]
    files = []
    for i, body in enumerate(bodies):  # named like `training.data --samples` names them
        files.append(tmp_path / f"test{i:05d}_{label_slug(classes[split.labels[i]])}.png")
        files[-1].write_bytes(body)
    expected = [classes[i] for i in offline_probabilities(served_model_dir, bodies).argmax(1).tolist()]
    truth = [label_slug(classes[label]) for label in split.labels[:3].tolist()]
    done = serve_cli(*on(model, "predict", str(tmp_path), "--top-k", "2", "--truth-from-name"))
    assert done.returncode == 0, done.stderr
    header, *rows, summary = done.stdout.splitlines()
    # Columns are separated by 2+ spaces; a cell is "<label> <probability>" (labels may hold a space).
    cells = [re.split(r"\s{2,}", line) for line in [header, *rows]]
    assert cells[0] == ["image", "truth", "top-1 ok", "top-1", "top-2"]
    assert [row[:2] for row in cells[1:]] == [[str(f), t] for f, t in zip(files, truth, strict=True)]
    assert [row[3].rsplit(" ", 1)[0] for row in cells[1:]] == expected
    hits = sum(label_slug(e) == t for e, t in zip(expected, truth, strict=True))
    assert summary == f"{hits} of 3 top-1 predictions match the label in the file name"


def test_predict_lists_a_refused_image_in_its_row_and_exits_1(model: Instance, tmp_path: Path) -> None:
    (tmp_path / "a_good.png").write_bytes(encode(np.zeros((28, 28), dtype=np.uint8)))
    (tmp_path / "b_bad.png").write_bytes(b"not an image")
    done = serve_cli(*on(model, "predict", str(tmp_path), "--top-k", "1"))
    assert done.returncode == 1
    good, bad = done.stdout.splitlines()[1:]
    assert "HTTP" not in good and "HTTP 400 unsupported_image" in bad
    assert "1 of 2 images were refused" in done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["register"],
        ["unregister"],
        ["scale", "--min-workers", "1", "--max-workers", "1"],
        ["set-default", "0000deadbeef"],
    ],
    ids=["status", "register", "unregister", "scale", "set-default"],
)
def test_commands_explain_a_server_that_is_not_running(tmp_path: Path, command: list[str]) -> None:
    done = serve_cli(*on(Instance("never-started", tmp_path), *command))
    assert done.returncode == 1
    assert "is not running" in done.stderr and "python -m scripts.serve start" in done.stderr
    assert "Traceback" not in done.stderr


def test_predict_explains_an_unreachable_server(image: Path) -> None:
    port = free_ports(1)[0]
    done = serve_cli("--inference-url", f"http://127.0.0.1:{port}", "predict", str(image))
    assert done.returncode == 1
    assert f"no TorchServe answers at http://127.0.0.1:{port}" in done.stderr


def test_predict_explains_a_wrong_key(model: Instance, image: Path, tmp_path: Path) -> None:
    keys = json.loads(model.key_file.read_text())
    keys["inference"]["key"] = "wrong"
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    done = serve_cli(*on(model, "--key-file", str(tmp_path / "keys.json"), "predict", str(image)))
    assert done.returncode == 1
    assert "refused the inference key" in done.stderr


def test_predict_explains_a_model_that_is_not_registered(server: Instance, image: Path) -> None:
    done = serve_cli(*on(server, "predict", "--model", "not_registered", str(image)))
    assert done.returncode == 1
    assert "is not registered: run `python -m scripts.serve register`" in done.stderr


@pytest.mark.parametrize("archive", ["missing.mar", "http://127.0.0.1:1/fashion_mnist.mar"])
def test_register_explains_an_archive_outside_the_store(server: Instance, archive: str) -> None:
    done = serve_cli(*on(server, "register", archive))
    assert done.returncode == 1
    assert "registration refused" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "no/such/file.png"], "does not exist"),
        (["scale", "--min-workers", "2", "--max-workers", "1"], "need 0 <= --min-workers <= --max-workers"),
        (["start", "--model-store", "no/such/store"], "does not exist: build the archive"),
        (["deploy", "no/such/fashion_mnist.mar"], "does not exist: build it with `python -m archive.build`"),
        (["frobnicate"], "invalid choice"),
        (
            ["--inference-url", "localhost:8080", "predict", "x.png"],
            "is not a server URL; give one like http://",
        ),
        (["--management-url", "http://127.0.0.1:http", "status"], "is not a server URL"),
    ],
    ids=[
        "missing-image",
        "bad-worker-range",
        "missing-store",
        "missing-archive",
        "unknown-command",
        "url-without-scheme",
        "url-with-a-bad-port",
    ],
)
def test_bad_input_exits_2_with_the_fix(tmp_path: Path, args: list[str], message: str) -> None:
    done = serve_cli(*on(Instance("input", tmp_path), *args))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_deploy_refuses_a_file_that_is_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "fashion_mnist.mar").write_text("not a zip")
    done = serve_cli(*on(Instance("input", tmp_path), "deploy", str(tmp_path / "fashion_mnist.mar")))
    assert done.returncode == 2
    assert "is not a model archive" in done.stderr and "python -m archive.build" in done.stderr
