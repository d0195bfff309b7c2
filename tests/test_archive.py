"""archive.build: what goes into the .mar, what it refuses to build from, and its self-check.

Builds run the real torch-model-archiver and the real self-check (TorchServe's worker code in a
fresh interpreter), on a random-weights export, so each build takes a few seconds. They archive the
export itself (the fp32 variant): random weights have no accuracy for the default int8 variant to
keep, and tests/test_variants.py builds the variants.

    python -m pytest tests/test_archive.py -q
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from archive.build import (
    HANDLER_PACKAGE,
    ArchiveError,
    BuildResult,
    ServingConfig,
    build,
    main,
    require_inside,
    self_check,
)
from handler.variants import EXPORTED_VARIANT
from tests.conftest import make_random_export
from training.data import CLASSES

HANDLER_FILES = sorted(path.name for path in HANDLER_PACKAGE.glob("*.py"))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_export(tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def built(export: Path, tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    return build(export, tmp_path_factory.mktemp("store"), variant=EXPORTED_VARIANT)


@pytest.fixture
def published(built: BuildResult, tmp_path: Path) -> Path:
    """A store that already holds the module's archive (version 1.0 of the seed-0 model)."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(built.path, store / built.path.name)
    return store


def test_archive_holds_the_handler_package_metadata_and_config(built):
    with zipfile.ZipFile(built.path) as mar:
        names = set(mar.namelist())
    expected = {
        "fashion_handler.py",
        "model.pt",
        "model_meta.json",
        "index_to_name.json",
        "model-config.yaml",
    }
    expected |= {"MAR-INF/MANIFEST.json"} | {f"handler/{name}" for name in HANDLER_FILES}
    assert names == expected


def test_archived_files_are_the_exported_and_repository_files(built, export):
    with zipfile.ZipFile(built.path) as mar:
        for name in ("model.pt", "model_meta.json", "index_to_name.json"):
            assert mar.read(name) == (export / name).read_bytes(), name
        for name in HANDLER_FILES:
            assert mar.read(f"handler/{name}") == (HANDLER_PACKAGE / name).read_bytes(), name
        assert mar.read("fashion_handler.py") == (HANDLER_PACKAGE / "fashion_handler.py").read_bytes()


def test_manifest_names_the_handler_model_version_and_config(built):
    with zipfile.ZipFile(built.path) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
    assert manifest == {
        "modelName": "fashion_mnist",
        "serializedFile": "model.pt",
        "handler": "fashion_handler.py",
        "modelVersion": "1.0",
        "configFile": "model-config.yaml",
    }


def test_default_model_config_suits_a_two_core_host(built):
    with zipfile.ZipFile(built.path) as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert config == {
        "minWorkers": 2,
        "maxWorkers": 2,
        "batchSize": 8,
        "maxBatchDelay": 2,
        "responseTimeout": 30,
        "startupTimeout": 120,
        "deviceType": "cpu",
    }


def test_build_self_checks_the_archive(built):
    assert built.check_summary["statuses"] == [200, 400]
    assert (built.check_summary["model"], built.check_summary["version"]) == ("fashion_mnist", "1.0")
    assert built.check_summary["top"]["label"] in CLASSES


def test_cli_builds_with_serving_flags_and_reports_path_size_version(export, tmp_path, capsys):
    store = tmp_path / "store"
    flags = ["--batch-size", "4", "--max-batch-delay", "20", "--min-workers", "2", "--max-workers", "3"]
    argv = ["--export-dir", str(export), "--store", str(store), "--name", "fm_canary", "--variant", "fp32"]
    assert main([*argv, *flags]) == 0
    mar = store / "fm_canary.mar"
    with zipfile.ZipFile(mar) as archive:
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert (config["batchSize"], config["maxBatchDelay"], config["minWorkers"], config["maxWorkers"]) == (
        4,
        20,
        2,
        3,
    )
    out = capsys.readouterr().out
    assert f"archive: {mar}" in out
    assert f"size:    {mar.stat().st_size} bytes" in out
    assert "version: 1.0" in out
    assert sorted(path.name for path in store.iterdir()) == ["fm_canary.mar"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (ServingConfig(min_workers=3, max_workers=2), "--min-workers <= --max-workers"),
        (ServingConfig(batch_size=0), "--batch-size >= 1"),
        (ServingConfig(response_timeout=0), "--response-timeout >= 1"),
    ],
)
def test_impossible_serving_flags_are_refused(export, tmp_path, flags, message):
    with pytest.raises(ArchiveError, match=message):
        build(export, tmp_path / "store", config=flags, variant=EXPORTED_VARIANT)


@pytest.mark.parametrize("name", ["../outside", "fashion mnist", ".hidden", ""])
def test_model_names_unsafe_in_urls_and_paths_are_refused(export, tmp_path, name):
    with pytest.raises(ArchiveError, match="must match"):
        build(export, tmp_path / "store", name=name, variant=EXPORTED_VARIANT)
    assert not (tmp_path / "store").exists()


def _write_meta(export: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((export / "model_meta.json").read_text())
    change(meta)
    (export / "model_meta.json").write_text(json.dumps(meta))


def _symlink_meta_outside(export: Path) -> None:
    outside = export.parent / "elsewhere.json"
    (export / "model_meta.json").rename(outside)
    (export / "model_meta.json").symlink_to(outside)


BROKEN_EXPORTS = {
    "no-model": (
        lambda d: (d / "model.pt").unlink(),
        r"model\.pt not found; run `python -m training\.export`",
    ),
    "no-meta": (lambda d: (d / "model_meta.json").unlink(), r"model_meta\.json not found"),
    "no-index": (lambda d: (d / "index_to_name.json").unlink(), r"index_to_name\.json not found"),
    "meta-not-json": (lambda d: (d / "model_meta.json").write_text("{"), "is not valid JSON"),
    "meta-lacks-version": (lambda d: _write_meta(d, lambda m: m.pop("version")), r"lacks \['version'\]"),
    "meta-lacks-classes": (lambda d: _write_meta(d, lambda m: m.pop("classes")), r"lacks \['classes'\]"),
    "meta-lacks-preprocess-mean": (
        lambda d: _write_meta(d, lambda m: m["preprocess"].pop("mean")),
        r"preprocess fields \['mean'\]",
    ),
    "classes-disagree": (
        lambda d: _write_meta(d, lambda m: m.update(classes=CLASSES[::-1])),
        "both must come from the same",
    ),
    "index-has-gap": (
        lambda d: (d / "index_to_name.json").write_text(json.dumps({"0": "a", "2": "b"})),
        "keys must be 0",
    ),
    "version-unsafe-in-urls": (
        lambda d: _write_meta(d, lambda m: m.update(version="1.0/../x")),
        "must match",
    ),
    "model-output-size": (
        lambda d: make_random_export(d, model_classes=7),
        r"outputs shape \(1, 7\) but the metadata lists 10 classes",
    ),
    "model-not-torchscript": (
        lambda d: (d / "model.pt").write_bytes(b"not a model"),
        "is not a TorchScript model",
    ),
    "meta-symlinked-outside": (_symlink_meta_outside, "outside"),
}


@pytest.mark.parametrize("case", list(BROKEN_EXPORTS))
def test_broken_exports_are_refused_and_nothing_is_written(tmp_path, case):
    breaks, message = BROKEN_EXPORTS[case]
    export = make_random_export(tmp_path / "export")
    breaks(export)
    store = tmp_path / "store"
    with pytest.raises(ArchiveError, match=message):
        build(export, store, variant=EXPORTED_VARIANT)
    assert not store.exists() or not any(store.iterdir())


def test_missing_export_dir_names_the_export_command(tmp_path, capsys):
    assert main(["--export-dir", str(tmp_path / "nothing"), "--store", str(tmp_path / "store")]) == 2
    assert "run `python -m training.export`" in capsys.readouterr().err


@pytest.mark.parametrize("inside", [False, True], ids=["symlink-out-of-root", "symlink-within-root"])
def test_files_must_resolve_inside_their_root(tmp_path, inside):
    root = tmp_path / "repo"
    root.mkdir()
    real = (root if inside else tmp_path) / "real.py"
    real.write_text("")
    link = root / "handler.py"
    link.symlink_to(real)
    if inside:
        assert require_inside(link, root, "handler file") == real.resolve()
    else:
        with pytest.raises(ArchiveError, match="outside"):
            require_inside(link, root, "handler file")


def test_failed_self_check_leaves_the_store_untouched(published, tmp_path):
    # Metadata the handler cannot serve (a resample mode it does not know) passes the static
    # checks; only answering a real request shows the archive is broken.
    export = make_random_export(tmp_path / "export", version="2.0")
    _write_meta(export, lambda m: m["preprocess"].update(resample="lanczos"))
    before = (published / "fashion_mnist.mar").read_bytes()
    with pytest.raises(ArchiveError, match="failed its self-check"):
        build(export, published, variant=EXPORTED_VARIANT)
    assert (published / "fashion_mnist.mar").read_bytes() == before
    assert sorted(path.name for path in published.iterdir()) == ["fashion_mnist.mar"]


def test_self_check_imports_only_what_the_archive_ships(built, tmp_path):
    # Without handler/payload.py in the archive the check must fail, not fall back to the repository's.
    stripped = tmp_path / "stripped.mar"
    with zipfile.ZipFile(built.path) as source, zipfile.ZipFile(stripped, "w") as target:
        for item in source.infolist():
            if item.filename != "handler/payload.py":
                target.writestr(item, source.read(item))
    with pytest.raises(ArchiveError, match="handler.payload"):
        self_check(stripped, tmp_path / "unpacked")


@pytest.mark.parametrize(
    ("export_args", "replaced"),
    [({}, "replaced version 1.0 (same model)"), ({"version": "1.1", "seed": 1}, "replaced version 1.0")],
    ids=["same-model", "new-version"],
)
def test_existing_archive_is_replaced_by_same_model_or_new_version(
    published, tmp_path, export_args, replaced
):
    export = make_random_export(tmp_path / "export", **export_args)
    result = build(export, published, variant=EXPORTED_VARIANT)
    assert result.replaced == replaced
    assert result.version == export_args.get("version", "1.0")
    assert sorted(path.name for path in published.iterdir()) == ["fashion_mnist.mar"]


def test_same_version_of_a_different_model_is_refused_unless_forced(published, tmp_path):
    export = make_random_export(tmp_path / "export", seed=1)
    before = (published / "fashion_mnist.mar").read_bytes()
    with pytest.raises(ArchiveError, match="already holds version 1.0 of a different model"):
        build(export, published, variant=EXPORTED_VARIANT)
    assert (published / "fashion_mnist.mar").read_bytes() == before
    assert build(export, published, force=True, variant=EXPORTED_VARIANT).replaced == "overwritten (--force)"
    with zipfile.ZipFile(published / "fashion_mnist.mar") as mar:
        assert mar.read("model.pt") == (export / "model.pt").read_bytes()


def test_same_weights_in_different_bytes_count_as_the_same_model(published, tmp_path):
    """A rebuild re-scripts the model, so model.pt's bytes differ; what it computes does not."""
    export = make_random_export(tmp_path / "export")
    scripted = torch.jit.load(str(export / "model.pt"))
    torch.jit.save(scripted, str(export / "model.pt"), _extra_files={"rebuilt": "yes"})
    with zipfile.ZipFile(published / "fashion_mnist.mar") as mar:
        assert mar.read("model.pt") != (export / "model.pt").read_bytes()
    assert build(export, published, variant=EXPORTED_VARIANT).replaced == "replaced version 1.0 (same model)"


def test_unreadable_file_in_the_way_is_refused_unless_forced(export, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "fashion_mnist.mar").write_text("not an archive")
    with pytest.raises(ArchiveError, match="not a readable model archive.*--force"):
        build(export, store, variant=EXPORTED_VARIANT)
    assert zipfile.is_zipfile(build(export, store, force=True, variant=EXPORTED_VARIANT).path)
