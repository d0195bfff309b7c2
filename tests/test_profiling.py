"""The profile commands: training steps under torch.profiler, the handler's stage breakdown, and
py-spy on a live TorchServe worker, each on tiny data and short runs.

    python -m pytest tests/test_profiling.py -q
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serving import profile as serving_profile
from tests.conftest import make_random_export
from training import profile as training_profile


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """Both commands set the process's torch threads (as training and a worker do); restore them."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


TINY = ["data.batch_size=32", "data.num_workers=0", "model.width=8", "model.depth=1", "logger=csv"]


def test_training_profile_writes_a_trace_and_operator_tables(tiny_data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    argv = ["--steps", "2", "--warmup", "1", "--out", str(out), f"data.root={tiny_data_root}", *TINY]
    assert training_profile.main(argv) == 0
    trace = json.loads((out / "training_trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert {"ProfilerStep#1", "ProfilerStep#2"} <= names, "both profiled steps must be in the trace"
    assert any(name.startswith("enumerate(DataLoader)") for name in names), "the DataLoader must be profiled"
    with (out / "training_ops.csv").open() as fh:
        ops = {row["operator"]: row for row in csv.DictReader(fh)}
    assert "aten::convolution_backward" in ops and float(ops["aten::convolution_backward"]["self_cpu_us"]) > 0
    tables = (out / "training_ops.txt").read_text()
    assert "by self CPU time" in tables and "by CPU memory" in tables and "aten::" in tables
    summary = (out / "training_summary.md").read_text()
    assert "| 2 |" in summary and "waiting for the DataLoader" in summary


def test_training_comparison_times_both_configs_in_turns(tiny_data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare"
    argv = ["--steps", "1", "--warmup", "1", "--rounds", "1", "--out", str(out), "--against", "model.width=4"]
    assert training_profile.main([*argv, f"data.root={tiny_data_root}", *TINY]) == 0
    text = (out / "training_compare.md").read_text()
    assert "with `model.width=4`" in text and "base / changed = **" in text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.root=/nonexistent/profile-data"], "python -m training.data --out /nonexistent/profile-data"),
        (["model.widht=3"], "bad override"),
        (["trainer=ddp"], "without trainer=ddp"),
        (["model.width=0"], "model.width=0 (must be >= 1; default 32)"),
    ],
)
def test_training_profile_refuses_what_it_cannot_run_with_the_fix(
    overrides: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert training_profile.main(["--out", str(tmp_path), *overrides]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "training_trace.json").exists()


@pytest.fixture(scope="module")
def random_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_export(tmp_path_factory.mktemp("export"))


def test_handler_profile_breaks_a_batch_down_by_stage(random_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    argv = ["handler", "--model-dir", str(random_export), "--batch", "4", "--batches", "6"]
    assert serving_profile.main([*argv, "--data", str(tmp_path / "no-data"), "--out", str(out)]) == 0
    summary = (out / "serving_handler_summary.md").read_text()
    for stage in serving_profile.STAGES:
        assert f"| {stage} |" in summary, f"stage {stage!r} missing from the breakdown"
    assert "µs per request**" in summary
    trace = json.loads((out / "serving_handler_trace.json").read_text())
    assert "forward" in {event.get("name") for event in trace["traceEvents"]}, "stages are trace labels"
    assert "aten::" in (out / "serving_handler_ops.txt").read_text()


def test_handler_comparison_with_a_git_revision(random_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    argv = ["handler", "--model-dir", str(random_export), "--batch", "2", "--batches", "3", "--rounds", "1"]
    argv += ["--against", "HEAD", "--data", str(tmp_path / "no-data"), "--out", str(out)]
    assert serving_profile.main(argv) == 0
    text = (out / "serving_handler_compare.md").read_text()
    assert "| HEAD |" in text and "| this tree |" in text and "HEAD / this tree = **" in text


def test_handler_comparison_names_an_unknown_revision(
    random_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["handler", "--model-dir", str(random_export), "--against", "no-such-rev", "--out", str(tmp_path)]
    assert serving_profile.main(argv) == 2
    assert "git cannot read handler/ at 'no-such-rev'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["handler", "--model-dir", "/nonexistent/export"], "python -m training.export"),
        (["live", "--model-store", "/nonexistent/store"], "make archive"),
    ],
)
def test_serving_profile_refuses_missing_inputs_with_the_fix(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert serving_profile.main([*argv, "--out", str(tmp_path)]) == 2
    assert expected in capsys.readouterr().err


def ptrace_refused() -> str:
    """Why py-spy cannot read another process here ("" when it can): a dump of a sleeping child."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        command = [serving_profile.py_spy(), "dump", "--pid", str(child.pid)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    finally:
        child.kill()
        child.wait()
    return "" if done.returncode == 0 else done.stdout + done.stderr


@pytest.mark.serving
@pytest.mark.slow
@pytest.mark.solo  # 3 s of samples must show the handler's share; a loaded machine thins them out
def test_live_worker_profile_writes_a_flame_graph(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.reliability import random_archive

    try:
        serving_profile.py_spy()
    except serving_profile.InputError as err:
        pytest.fail(str(err))
    if refused := ptrace_refused():
        pytest.skip(f"ptrace is not allowed here, so py-spy cannot read a worker: {refused[-300:]}")
    store = random_archive(tmp_path_factory).store
    out = tmp_path_factory.mktemp("live")
    argv = ["live", "--model-store", str(store), "--seconds", "3", "--clients", "4", "--out", str(out)]
    assert serving_profile.main([*argv, "--data", os.devnull]) == 0
    svg = (out / "serving_flame.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "handle (fashion_handler.py" in svg, "the handler's frames must be in the flame graph"
    live = (out / "serving_live.md").read_text()
    assert "statuses {200:" in live, live
    handle = "| `FashionMNISTHandler.handle (fashion_handler.py)` |"
    assert handle in live, "handle must be among the functions by inclusive samples"
    assert "| callee of handle | share |\n|---|---|\n| `" in live, "handle's callees must be listed"
