"""The serving command lines share one exit-code convention: 2 and a message naming the fix for bad
input, before any server starts. (The serve command's runs against a real server are in
tests/test_serving_cli.py; the soak's in tests/test_soak.py.)

    python -m pytest tests/test_commands.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serving import REPO


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
