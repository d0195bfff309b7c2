"""The DVC pipeline (dvc.yaml) on tiny data: repro, skip when unchanged, push -> fresh clone -> pull.

The prepare stage only accepts the real, checksummed Fashion-MNIST, so the test writes a tiny
split with training.data's own `prepare` and records it with `dvc commit prepare` (DVC's way to
adopt outputs made outside `dvc repro`); every later stage runs for real through `dvc repro`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_idx_set
from training import data as data_mod
from training.params import render

REPO = Path(__file__).resolve().parent.parent
TINY = (
    "experiment=smoke", "data.val_size=60", "data.batch_size=16", "data.eval_batch_size=64",
    "trainer.limit_train_batches=8", "trainer.limit_val_batches=2",
)  # fmt: skip


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The venv first on PATH (dvc.yaml runs `python`), and a private HOME: the default remote is there."""
    home = tmp_path_factory.mktemp("home")
    git_identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    return {
        **os.environ,
        **git_identity,
        "GIT_COMMITTER_EMAIL": "t@t",
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONWARNINGS": "ignore::FutureWarning",
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A git repository holding the project's files, with the tiny split committed to DVC and reproduced."""
    repo = tmp_path_factory.mktemp("work") / "project"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file() and name != "dvc.lock":
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    (repo / "params.yaml").write_text(render(TINY))
    sums = write_idx_set(repo.parent / "raw")
    data_mod.prepare(repo / "data", repo.parent / "raw", val_size=60, allow_download=False, checksums=sums)
    data_mod.write_samples(repo / "data", repo / "data" / "samples", 10)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        run(cmd, repo, env)
    run(["dvc", "commit", "--force", "prepare"], repo, env)
    run(["dvc", "repro"], repo, env)
    return repo


def test_params_yaml_loads_back_as_exactly_the_composed_config(compose_cfg, tmp_path) -> None:
    """The train stage's `--config-name params` sees the values configs/ composes, schema included."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    (tmp_path / "params.yaml").write_text(render(["experiment=accurate", "model.width=40"]))
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        loaded = compose("params")
        with pytest.raises(Exception, match="model.width"):
            compose("params", overrides=["model.width=wide"])  # `dvc exp run -S` values are still typed
    expected = compose_cfg("experiment=accurate", "model.width=40")
    assert OmegaConf.to_container(loaded) == OmegaConf.to_container(expected, resolve=True)


def test_params_check_flags_a_stale_file(tmp_path, capsys) -> None:
    from training.params import main

    out = tmp_path / "params.yaml"
    assert main(["--out", str(out), "--check"]) == 1
    assert main(["--out", str(out)]) == 0
    assert main(["--out", str(out), "--check"]) == 0
    assert main(["--out", str(out), "--check", "model.width=48"]) == 1
    assert "run `python -m training.params`" in capsys.readouterr().err
    assert main(["--out", str(out), "model.width=wide"]) == 2


def stages_to_run(repo: Path, env: dict[str, str]) -> set[str]:
    status = json.loads(run(["dvc", "status", "--json"], repo, env).strip().splitlines()[-1])
    return {name.split(":")[-1] for name in status}


def test_repro_builds_every_output_and_records_the_data_hash(project: Path) -> None:
    meta = json.loads((project / "artifacts" / "model" / "model_meta.json").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    processed = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/processed")
    assert meta["data_hash"] == "md5:" + processed["md5"].removesuffix(".dir")
    assert meta["version"] == json.loads((project / "reports" / "metrics.json").read_text())["version"]
    assert (project / "model_store" / "fashion_mnist.mar").is_file()
    history = (project / "outputs" / "train" / "pipeline" / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_acc,val_loss,val_acc" and len(history) >= 2


def test_second_repro_runs_nothing(project: Path, env: dict[str, str]) -> None:
    out = run(["dvc", "repro"], project, env)
    assert "Running stage" not in out, out
    assert stages_to_run(project, env) == set()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model.width", 12, {"train"}),
        ("data.split_seed", 1, {"prepare", "train"}),
        ("logger.wandb", True, set()),
    ],
    ids=["model-retrains", "split-reprepares", "logger-changes-nothing"],
)
def test_a_changed_param_reruns_only_what_depends_on_it(project, env, key, value, expected) -> None:
    params = project / "params.yaml"
    original = params.read_text()
    doc = yaml.safe_load(original)
    group, name = key.split(".")
    doc[group][name] = value
    try:
        params.write_text(yaml.safe_dump(doc, sort_keys=False))
        # Downstream stages (export, evaluate, archive) show as changed once their inputs are rebuilt.
        assert stages_to_run(project, env) == expected
    finally:
        params.write_text(original)


def test_push_fresh_clone_pull_has_nothing_to_reproduce(project: Path, env: dict[str, str]) -> None:
    out = run(["dvc", "push"], project, env)
    assert "pushed" in out
    assert (Path(env["HOME"]) / ".cache" / "fashion-serve" / "dvc-remote").is_dir(), "default remote unused"
    run(["git", "add", "dvc.lock"], project, env)
    run(["git", "commit", "-qm", "pipeline results"], project, env)
    clone = project.parent / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], project.parent, env)
    assert not (clone / "data" / "processed").exists()
    run(["dvc", "pull"], clone, env)
    for path in ("data/processed/manifest.json", "artifacts/model/model_meta.json", "reports/metrics.json"):
        assert (clone / path).read_bytes() == (project / path).read_bytes(), path
    out = run(["dvc", "repro"], clone, env)
    assert "Running stage" not in out and "up to date" in out, out
