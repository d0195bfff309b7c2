"""training.export and training.evaluate on a briefly trained real model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.meta import MODEL_NAME, ModelMeta
from training import export as export_mod
from training.checkpoint import load_checkpoint
from training.data import CLASSES, load_split
from training.evaluate import (
    classification_report,
    evaluate,
    load_exported,
    predict_logits,
    preprocess_images,
)
from training.export import ExportError, check_parity, export


def test_meta_is_a_complete_model_meta(export_dir: Path) -> None:
    meta = ModelMeta.load(export_dir)
    written = json.loads((export_dir / "model_meta.json").read_text())
    assert set(written) == {f.name for f in dataclasses.fields(ModelMeta)}, "every field is written"
    assert (meta.name, meta.classes) == (MODEL_NAME, CLASSES)
    assert meta.preprocess.input_shape == [1, 28, 28]
    assert meta.config_hash.startswith("sha256:") and len(meta.config_hash) == 71
    assert 0.5 < meta.metrics["test_accuracy"] <= 1.0, "a trained model beats chance by far"
    stats = meta.reference_stats
    assert np.array(stats["pixel_mean"]).shape == (28, 28) and np.array(stats["pixel_std"]).shape == (28, 28)
    assert sum(stats["brightness_hist"]["counts"]) == stats["num_images"] == 55000


def test_meta_has_the_reference_the_server_bins_against(export_dir: Path) -> None:
    """handler/monitor.py bins live traffic with these edges; monitoring.rules compares with the counts."""
    stats = json.loads((export_dir / "model_meta.json").read_text())["reference_stats"]
    hists = stats["histograms"]
    assert set(hists) == {"brightness", "contrast", "white_share", "confidence"}
    for name in ("brightness", "contrast", "white_share"):
        edges, counts = hists[name]["edges"], hists[name]["counts"]
        assert edges[0] == 0.0 and edges[-1] == 1.0 and edges == sorted(set(edges)), name
        assert len(counts) == len(edges) - 1 and sum(counts) == 55000, name
    assert sum(hists["confidence"]["counts"]) == 5000, "confidence is measured on the validation split"
    assert sum(stats["class_counts"]) == 55000 and len(stats["class_counts"]) == len(CLASSES)


def test_version_is_derived_from_the_weights_and_reexport_keeps_it(
    trained_run: Path, real_data_root: Path, export_dir: Path, tmp_path: Path
) -> None:
    """No version typed: it is a hash of what the model computes, so a re-export gets the same one.

    `export_dir` is the other export of the same checkpoint (its version typed, "1.0"): what it
    recorded derives the same version."""
    from model import model_version

    meta = export(trained_run, tmp_path / "a", data_root=real_data_root)
    assert meta.version == model_version(meta.weights_digest, meta.to_json())
    fixture_meta = json.loads((export_dir / "model_meta.json").read_text())
    assert fixture_meta["version"] == "1.0" != meta.version
    assert meta.weights_digest == fixture_meta["weights_digest"], "same checkpoint, same weights digest"
    assert model_version(fixture_meta["weights_digest"], fixture_meta) == meta.version
    assert meta.data_hash is None, "a split not made by the DVC pipeline has no DVC hash to record"


def test_index_to_name_matches_classes(export_dir: Path) -> None:
    mapping = json.loads((export_dir / "index_to_name.json").read_text())
    assert [mapping[str(i)] for i in range(len(CLASSES))] == CLASSES


def test_exported_file_is_not_frozen_and_loads(export_dir: Path) -> None:
    """Unfrozen so other torch versions can load it; freezing happens after loading."""
    raw = torch.jit.load(str(export_dir / "model.pt"))
    assert any(True for _ in raw.parameters()), "a frozen module has no parameters left"
    frozen, _ = load_exported(export_dir)
    assert not any(True for _ in frozen.parameters())


def test_served_path_matches_export_accuracy(export_dir: Path, real_data_root: Path, tmp_path: Path) -> None:
    """evaluate() goes through the serving preprocess: same accuracy as export's tensor path."""
    report = evaluate(export_dir, real_data_root, tmp_path, progress=False)
    assert report["accuracy"] == pytest.approx(ModelMeta.load(export_dir).metrics["test_accuracy"], abs=1e-9)
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["per_class"]) == set(CLASSES) and saved["num_examples"] == 10_000


def test_parity_check_fails_loudly_on_a_mismatch(export_dir: Path, real_data_root: Path) -> None:
    model, meta = load_exported(export_dir)
    x = preprocess_images(load_split(real_data_root, "test").images[:64], meta.preprocess)

    class Shifted(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return model(t) + torch.linspace(0, 5, 10)

    with pytest.raises(ExportError, match="differs from the eager model"):
        check_parity(model, Shifted(), x)


def test_class_mismatch_is_caught_even_when_close(export_dir: Path, real_data_root: Path) -> None:
    model, meta = load_exported(export_dir)
    x = preprocess_images(load_split(real_data_root, "test").images[:300], meta.preprocess)

    class FlipsOne(torch.nn.Module):  # identical on the first batch, different later
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            out = model(t)
            if len(t) != 256:
                out[0] = -out[0]
            return out

    with pytest.raises(ExportError, match="different class"):
        check_parity(model, FlipsOne(), x)


def test_export_without_a_run_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="python -m training.train"):
        export(tmp_path / "missing", tmp_path / "out")


def test_export_cli_failure_keeps_previous_export(tmp_path: Path, export_dir: Path, capsys) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.pt").write_bytes(b"previous")
    assert export_mod.main(["--run", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"{export_mod.PROG}: error: {tmp_path / 'nope'}")
    assert (out / "model.pt").read_bytes() == b"previous"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda ckpt: ckpt.write_bytes(b"not a checkpoint"), id="garbage"),
        pytest.param(lambda ckpt: ckpt.write_bytes(ckpt.read_bytes()[:4096]), id="truncated"),
        pytest.param(lambda ckpt: torch.save({"state_dict": {}}, ckpt), id="not-from-training"),
    ],
)
def test_export_of_a_damaged_checkpoint_is_a_clear_error(
    damage, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage(run / "checkpoints" / "best.ckpt")
    assert export_mod.main(["--run", str(run), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    ckpt = run / "checkpoints" / "best.ckpt"
    assert err.startswith(f"{export_mod.PROG}: error: {ckpt} is not a readable training checkpoint"), err
    assert "python -m training.train" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()


def test_checkpoint_loads_as_lightning_loads_it(trained_run: Path) -> None:
    """training.checkpoint reads without Lightning exactly the network Lightning's own loader restores."""
    from training.train import FashionClassifier

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    net, spec = load_checkpoint(ckpt)
    module = FashionClassifier.load_from_checkpoint(str(ckpt), map_location="cpu")
    assert spec == module.spec and not net.training
    theirs = module.net.state_dict()
    assert net.state_dict().keys() == theirs.keys()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in net.state_dict().items())


def test_classification_report_counts() -> None:
    preds = np.array([0, 1, 1, 2])
    labels = np.array([0, 1, 2, 2])
    report = classification_report(preds, labels, ["a", "b", "c"])
    assert report["accuracy"] == 0.75
    assert report["per_class"]["b"] == {"precision": 0.5, "recall": 1.0, "support": 1}
    assert report["confusion_matrix"][2] == [0, 1, 1]


def test_predict_logits_batches_like_one_pass(export_dir: Path) -> None:
    model, _ = load_exported(export_dir)
    x = torch.randn(50, 1, 28, 28)
    torch.testing.assert_close(
        predict_logits(model, x, batch_size=7), predict_logits(model, x, batch_size=50)
    )


def test_evaluate_cli_without_export_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from training import evaluate as evaluate_mod

    assert evaluate_mod.main(["--model-dir", str(tmp_path / "none")]) == 2
    assert "python -m training.export" in capsys.readouterr().err


def test_export_refuses_a_version_unsafe_in_urls_before_any_work(tmp_path: Path, capsys) -> None:
    assert export_mod.main(["--run", str(tmp_path / "nope"), "--version", "1.0/../x"]) == 2
    assert "--version '1.0/../x' must match" in capsys.readouterr().err
