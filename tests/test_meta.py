"""handler.meta.ModelMeta: the one model_meta.json schema, saved and loaded without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handler.meta import INDEX_FILE, META_FILE, MODEL_NAME, MetaError, ModelMeta
from handler.preprocess import PreprocessSpec
from training.data import CLASSES


def sample() -> ModelMeta:
    return ModelMeta(
        version="1.2",
        classes=list(CLASSES),
        preprocess=PreprocessSpec(mean=0.3, std=0.4),
        metrics={"test_accuracy": 0.91},
        reference_stats={"brightness_hist": {"edges": [0.0, 1.0], "counts": [3]}, "extra": [1, 2]},
    )


def test_save_then_load_is_the_same_meta(tmp_path: Path) -> None:
    meta = sample()
    meta.save(tmp_path)
    assert ModelMeta.load(tmp_path) == meta
    assert json.loads((tmp_path / INDEX_FILE).read_text()) == {str(i): c for i, c in enumerate(CLASSES)}
    assert ModelMeta.load(tmp_path).name == MODEL_NAME


def test_reference_stats_is_free_form(tmp_path: Path) -> None:
    """New drift statistics go inside reference_stats without touching the schema."""
    sample().save(tmp_path)
    data = json.loads((tmp_path / META_FILE).read_text())
    data["reference_stats"]["per_class_hist"] = {"Bag": [1, 2, 3]}
    (tmp_path / META_FILE).write_text(json.dumps(data))
    assert ModelMeta.load(tmp_path).reference_stats["per_class_hist"] == {"Bag": [1, 2, 3]}


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("version"), r"lacks \['version'\]"),
        (lambda m: m.update(colour="L"), r"has fields \['colour'\] that handler/meta.py does not define"),
        (lambda m: m.update(version=3), "model version 3 must match"),
        (lambda m: m.update(name="a b"), "model name 'a b' must match"),
        (lambda m: m.update(classes=[]), "non-empty list"),
        (lambda m: m.update(classes=["a", "a"]), "unique"),
        (lambda m: m.update(preprocess="L"), "bad preprocess section"),
        (lambda m: m["preprocess"].pop("std"), r"bad preprocess section: .*\['std'\]"),
        (lambda m: m.update(metrics=[0.9]), "metrics must be a JSON object"),
    ],
)
def test_invalid_meta_names_the_file_and_the_fix(tmp_path: Path, change, message: str) -> None:
    sample().save(tmp_path)
    _edit(tmp_path / META_FILE, change)
    with pytest.raises(MetaError, match=message) as err:
        ModelMeta.load(tmp_path)
    text = str(err.value)
    assert text.startswith(str(tmp_path / META_FILE)) and "python -m training.export" in text, text


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        (lambda d: (d / META_FILE).unlink(), "model_meta.json: not found"),
        (lambda d: (d / META_FILE).write_bytes(b"\xff{"), "is not valid JSON"),
        (lambda d: (d / META_FILE).write_text("[]"), "expected a JSON object, got list"),
        (lambda d: (d / INDEX_FILE).write_text('{"0": "a"}'), "both must come from the same export"),
        (lambda d: (d / INDEX_FILE).write_text("7"), "index_to_name.json: "),
    ],
)
def test_unreadable_files_are_a_meta_error(tmp_path: Path, breaks, message: str) -> None:
    sample().save(tmp_path)
    breaks(tmp_path)
    with pytest.raises(MetaError, match=message):
        ModelMeta.load(tmp_path)
