"""Model versions derived from what the model computes, and deploy/set-default on a real TorchServe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from archive.build import build
from handler.variants import EXPORTED_VARIANT
from model import FashionCNN, model_version, weights_digest
from serving.client import Client, RequestFailed, deploy
from serving.server import ANY_PORTS, Instance, start, stop
from tests.conftest import make_random_export

META = {"architecture": {"width": 8}, "preprocess": {"mean": 0.5}, "classes": ["a", "b"]}


def scripted(seed: int) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    return torch.jit.script(FashionCNN(num_classes=10, width=8, depth=1).eval())


def resaved(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={"note": "other bytes, same weights"})
    return torch.jit.load(io.BytesIO(buf.getvalue()))


def test_same_weights_give_the_same_version_whatever_the_bytes() -> None:
    model = scripted(0)
    assert model_version(weights_digest(model), META) == model_version(weights_digest(resaved(model)), META)


@pytest.mark.parametrize(
    "change",
    [
        lambda meta: (scripted(1), meta),
        lambda meta: (scripted(0), {**meta, "classes": ["b", "a"]}),
        lambda meta: (scripted(0), {**meta, "preprocess": {"mean": 0.4}}),
    ],
    ids=["weights", "classes", "preprocessing"],
)
def test_what_changes_the_answers_changes_the_version(change) -> None:
    model, meta = change(META)
    assert model_version(weights_digest(model), meta) != model_version(weights_digest(scripted(0)), META)


def test_timestamps_and_metrics_do_not_change_the_version() -> None:
    digest = weights_digest(scripted(0))
    noisy = {**META, "created_at": "2030-01-01", "git_commit": "abc", "metrics": {"test_accuracy": 0.5}}
    assert model_version(digest, noisy) == model_version(digest, META)


def derived_export(directory: Path, seed: int) -> str:
    """A random export whose version is derived like training.export's; returns the version."""
    make_random_export(directory, seed=seed)
    meta = json.loads((directory / "model_meta.json").read_text())
    meta["version"] = model_version(weights_digest(torch.jit.load(str(directory / "model.pt"))), meta)
    (directory / "model_meta.json").write_text(json.dumps(meta))
    return meta["version"]


@pytest.mark.serving
def test_deploy_registers_beside_the_old_version_and_set_default_rolls_back(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    store = tmp_path / "store"
    old, new = (derived_export(tmp_path / f"export{seed}", seed) for seed in (0, 1))
    # A short state dir: TorchServe's unix socket paths live under it (serving/server.py checks).
    instance = Instance("versions", tmp_path_factory.mktemp("serve"))
    build(tmp_path / "export0", store, variant=EXPORTED_VARIANT)  # random weights: no int8
    start(instance, store, ANY_PORTS)
    try:
        client = Client.for_instance(instance)
        assert deploy(client, store / "fashion_mnist.mar") == ("fashion_mnist", old, True)
        # The pipeline's archive now holds the retrained model.
        build(tmp_path / "export1", store, variant=EXPORTED_VARIANT)
        assert deploy(client, store / "fashion_mnist.mar") == ("fashion_mnist", new, True)
        assert sorted(client.versions()) == sorted([old, new])
        assert client.default_version() == new, "the new version must be the default"
        assert (store / f"fashion_mnist-{old}.mar").is_file() and (
            store / f"fashion_mnist-{new}.mar"
        ).is_file()

        client.set_default(old)  # the rollback
        assert client.default_version() == old
        # Deploying a version that is already up only makes it the default again.
        assert deploy(client, store / "fashion_mnist.mar") == ("fashion_mnist", new, False)
        assert client.default_version() == new
        with pytest.raises(RequestFailed, match="status` lists the registered versions"):
            client.set_default("0000deadbeef")
    finally:
        stop(instance)
