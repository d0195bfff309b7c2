"""Distributed training: real 2-process DDP on CPU (gloo), a few batches of the real data.

    python -m pytest tests/test_ddp.py -q

torchrun starts tests/ddp_probe.py twice; each rank trains through training.train into its own
directory and records what it saw, so the test can compare ranks: disjoint shards, identical
parameters after the steps, one validation accuracy for the whole validation set, and nothing
written by rank 1. Two more tests start the real CLI: once letting Lightning launch the second
process, once as the documented multi-node torchrun command run as two nodes on this host.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# A few batches per rank: 6 steps of 16 images, 2 validation batches of 64.
FEW_BATCHES = (
    "experiment=smoke", "trainer=ddp", "trainer.progress_bar=false", "data.batch_size=16",
    "trainer.limit_train_batches=6", "trainer.limit_val_batches=2", "data.eval_batch_size=64",
)  # fmt: skip


def run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def ranks(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Both ranks' records from one torchrun launch, and the launch's output directory."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    overrides = [*FEW_BATCHES, f"data.root={real_data_root}", "logger=wandb", "logger.wandb=true"]
    run([*torchrun, "-m", "tests.ddp_probe", str(out), *overrides], out)
    records = [torch.load(out / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    return out, records


@pytest.mark.slow
def test_ranks_train_and_validate_on_disjoint_shards(ranks) -> None:
    _, (r0, r1) = ranks
    assert len(r0["train_ids"]) == len(r1["train_ids"]) == 6 * 16
    assert not set(r0["train_ids"]) & set(r1["train_ids"]), "both ranks trained on the same images"
    v0, v1 = r0["val_shard"], r1["val_shard"]
    assert v0["total"] == v1["total"] == 2 * 64
    assert not set(v0["ids"]) & set(v1["ids"]), "both ranks validated on the same images"


@pytest.mark.slow
def test_parameters_stay_identical_across_ranks(ranks) -> None:
    _, (r0, r1) = ranks
    names = r0["params_after"].keys()
    assert names == r1["params_after"].keys()
    moved = [n for n in names if not torch.equal(r0["params_before"][n], r0["params_after"][n])]
    assert moved, "no parameter changed: nothing was trained"
    differ = [n for n in names if not torch.equal(r0["params_after"][n], r1["params_after"][n])]
    assert not differ, f"gradients were not synchronised: ranks differ in {differ}"


@pytest.mark.slow
def test_validation_accuracy_is_reduced_over_both_shards(ranks) -> None:
    out, (r0, r1) = ranks
    (c0, n0), (c1, n1) = ((r["val_shard"]["correct"], r["val_shard"]["total"]) for r in (r0, r1))
    # Unequal shard accuracies make the check decisive: rank 0 alone would report c0 / n0.
    assert c0 / n0 != c1 / n1, "the shards score the same; pick other batch limits so the test can fail"
    pooled = (c0 + c1) / (n0 + n1)
    assert r0["reported_val_acc"] == pytest.approx(pooled) == r1["reported_val_acc"]
    rows = list(csv.DictReader((out / "rank0" / "run" / "logs" / "metrics.csv").open()))
    logged = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert logged == [pytest.approx(pooled)]


@pytest.mark.slow
def test_only_rank_zero_writes(ranks) -> None:
    out, _ = ranks
    assert not (out / "rank1").exists(), sorted(p.name for p in (out / "rank1").rglob("*"))
    run_dir = out / "rank0" / "run"
    for name in ("config.yaml", "summary.yaml", "logs/metrics.csv", "history.csv", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), f"rank 0 did not write {name}"
    assert list((run_dir / "wandb").glob("offline-run-*")), "rank 0 wrote no offline W&B run"
    for name in ("model.pt", "model_meta.json"):
        assert (out / "rank0" / "export" / name).is_file(), f"rank 0 did not export {name}"


@pytest.mark.slow
def test_lightning_launches_ddp_from_the_cli(real_data_root: Path, tmp_path: Path) -> None:
    """`python -m training.train trainer=ddp`: Lightning starts rank 1 itself (Hydra's run dir passed on)."""
    cli = [sys.executable, "-m", "training.train", *FEW_BATCHES, f"data.root={real_data_root}"]
    proc = run([*cli, f"run_root={tmp_path / 'runs'}"], tmp_path)
    run_dir = (tmp_path / "runs" / "latest").resolve()
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name != "latest"] == [run_dir.name]
    # Hydra's job log of the process Lightning started: proof that there were two.
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert proc.stdout.count("next:       python -m training.export") == 1, proc.stdout


@pytest.mark.slow
def test_torchrun_nodes_meet_at_node_zero(real_data_root: Path, tmp_path: Path) -> None:
    """docs/training.md's multi-node command, as two nodes of one process each on this host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WANDB_MODE": "offline"}
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "training.train", *FEW_BATCHES, "trainer.num_nodes=2", "trainer.devices=1",
               f"data.root={real_data_root}", f"hydra.run.dir={tmp_path / f'node{rank}'}",
               f"export_dir={tmp_path / f'export{rank}'}"]  # fmt: skip
        nodes.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert (tmp_path / "node0" / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "export0" / "model.pt").is_file() and not (tmp_path / "export1").exists()
    # Node 1's run dir holds only what Hydra writes in every process.
    assert {p.name for p in (tmp_path / "node1").iterdir()} <= {".hydra", "train.log"}
    assert [out.count(f"exported:   {tmp_path / 'export0'}") for out, _ in outputs] == [1, 0]


def test_a_setting_lightning_refuses_is_a_clear_error(tmp_path: Path) -> None:
    """The command line's contract: exit 2, Lightning's reason and where the setting came from."""
    cmd = [sys.executable, "-m", "training.train", "trainer=ddp", "trainer.strategy=dpp",
           f"run_root={tmp_path}", f"data.root={tmp_path / 'data'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid strategy name" in proc.stderr and "trainer.* overrides" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_precision_lightning_refuses_is_a_settings_error(compose_cfg, tmp_path: Path) -> None:
    """The same refusal for a precision, in process: train() raises the SettingsError (exit code 2)
    that the command line answers as above."""
    from training.train import SettingsError, train

    cfg = compose_cfg("trainer=ddp", "trainer.precision=fp8", "logger=csv", f"data.root={tmp_path / 'data'}")
    with pytest.raises(SettingsError, match=r"precision.*trainer\.\* overrides") as err:
        train(cfg, tmp_path / "run")
    assert err.value.exit_code == 2
