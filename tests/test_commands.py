"""The serving command lines share one exit-code convention: 2 and a message naming the fix for bad
input, before any server starts. (The serve command's runs against a real server are in
tests/test_serving_cli.py; the soak's in tests/test_soak.py.)

    python -m pytest tests/test_commands.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from serving import REPO, peers


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["scripts.soak", "--model-store", "{tmp}", "--no-doc"], "fashion_mnist.mar not found: build it"),
        (["scripts.soak", "--minutes", "soon"], "invalid float value"),
        (["scripts.bench_serving", "--model-store", "{tmp}"], "fashion_mnist.mar not found"),
        (["scripts.bench_variants", "--export-dir", "{tmp}", "--doc", "{tmp}/x.md"], "training.export"),
        (["scripts.serve", "--state-dir", "{tmp}", "predict", "{tmp}"], "no images"),
        (["serving.tsconfig", "--print", "laptop"], "invalid choice"),
    ],
    ids=[
        "soak-no-archive",
        "soak-bad-flag",
        "bench-no-archive",
        "variants-no-export",
        "predict-no-images",
        "tsconfig-bad-target",
    ],
)
def test_bad_input_exits_2_and_names_the_fix(tmp_path: Path, command: list[str], message: str) -> None:
    args = [arg.format(tmp=tmp_path) for arg in command]
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def made(tmp_path: Path) -> None:
    """Files where `make all` leaves them (empty: the commands below stop before reading them), and
    under bad/ an archive that is no zip file."""
    exported = ("export/model.pt", "export/model_meta.json", "export/index_to_name.json")
    for name in (*exported, "bad/fashion_mnist.mar"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "store").mkdir()
    with zipfile.ZipFile(tmp_path / "store" / "fashion_mnist.mar", "w") as archive:
        for name in peers.SERVED_FILES:
            archive.writestr(name, b"")


PEERS = ["scripts.bench_peers", "--model-store", "{tmp}/store"]


@pytest.mark.parametrize(
    ("command", "no_wrk", "message"),
    [
        (["scripts.bench_peers", "--model-store", "{tmp}"], False, "fashion_mnist.mar not found: build it"),
        (["scripts.bench_peers", "--model-store", "{tmp}/bad"], False, "not a zip file: rebuild it with"),
        ([*PEERS, "--clients", "1", "4"], False, "--clients must include 1 and 16"),
        ([*PEERS, "--configs", "2x8"], False, "is not WORKERS:BATCH:DELAY_MS"),
        (PEERS, True, "wrk not found on PATH: install it with `apt-get install wrk`"),
        ([*PEERS, "--peer-python", "{tmp}/none/bin/python"], False, "create it with `make bench-peers`"),
        ([*PEERS, "--peer-torch-threads", "-1"], False, "--peer-torch-threads >= 0"),
        (["scripts.bench_serving", "--model-store", "{tmp}/store"], True, "apt-get install wrk"),
        (["scripts.sweep_serving", "--model-store", "{tmp}"], False, "fashion_mnist.mar not found: build it"),
        (["scripts.sweep_serving", "--model-store", "{tmp}/store"], True, "apt-get install wrk"),
        (["scripts.sweep_serving", "--delays", "-1"], False, "must be >= 0"),
    ],
    ids=[
        "peers-no-archive",
        "peers-not-an-archive",
        "peers-no-16",
        "peers-bad-config",
        "peers-no-wrk",
        "peers-no-venv",
        "peers-negative-threads",
        "serving-no-wrk",
        "sweep-no-archive",
        "sweep-no-wrk",
        "sweep-bad-delay",
    ],  # fmt: skip
)
def test_benchmarks_exit_2_and_name_the_fix(
    tmp_path: Path, command: list[str], no_wrk: bool, message: str
) -> None:
    made(tmp_path)
    env = {**os.environ, "PATH": str(tmp_path)} if no_wrk else None  # a PATH without wrk
    args = [arg.format(tmp=tmp_path) for arg in command]
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
