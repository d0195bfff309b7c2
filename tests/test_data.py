"""training.data: sources, IDX parsing, checksums, the split and its errors, on tiny generated files."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import idx_bytes, write_idx_set
from training import data as data_mod
from training.data import CLASSES, DataError, load_split, parse_idx, prepare, split_indices


def _prepare(raw: Path, sums, out: Path, **kw) -> dict:
    kw.setdefault("debian_dir", out / "no-debian")
    return prepare(
        out, raw, val_size=kw.pop("val_size", 60), seed=0, allow_download=False, checksums=sums, **kw
    )


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_prepare_reads_both_layouts(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "src"
    raw = root if layout == "flat" else root / "FashionMNIST" / "raw"
    sums = write_idx_set(raw)
    manifest = _prepare(root, sums, tmp_path / "out")
    assert manifest["counts"] == {"train": 180, "val": 60, "test": 60}
    assert manifest["raw_dir"] == str(raw)
    train = load_split(tmp_path / "out", "train")
    assert train.images.shape == (180, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and int(train.labels.max()) <= 9


def test_parse_idx_roundtrip() -> None:
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array)), array)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x0d\x03" + b"\x00" * 12, "not a uint8 IDX"),
        (idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5], "truncated or padded"),
    ],
)
def test_parse_idx_rejects_bad_files(raw: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_idx(raw, "x")


def test_split_is_deterministic_and_disjoint() -> None:
    a_train, a_val = split_indices(1000, 100, seed=3)
    b_train, b_val = split_indices(1000, 100, seed=3)
    np.testing.assert_array_equal(a_val, b_val)
    assert len(np.intersect1d(a_train, a_val)) == 0 and len(a_train) + len(a_val) == 1000
    assert not np.array_equal(split_indices(1000, 100, seed=4)[1], a_val), "seed must change the split"


def test_split_is_deterministic_on_disk(tmp_path: Path, idx_dir) -> None:
    raw, sums = idx_dir
    _prepare(raw, sums, tmp_path / "a")
    _prepare(raw, sums, tmp_path / "b")
    assert torch.equal(load_split(tmp_path / "a", "val").labels, load_split(tmp_path / "b", "val").labels)


def test_missing_data_lists_every_source_and_the_fixes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        data_mod.locate(None, debian_dir=tmp_path / "no-debian", allow_download=False)
    text = str(info.value)
    for expected in (
        "--source-dir DIR",
        "no-debian",
        "download",
        "apt-get install dataset-fashion-mnist",
        "internet",
    ):
        assert expected in text


def test_an_explicit_source_dir_without_the_files_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    # The Debian copy is complete, yet a named directory that lacks files must not quietly be swapped
    # for it: the user meant other data.
    write_idx_set(tmp_path / "debian")
    (tmp_path / "mine").mkdir()
    write_idx_set(tmp_path / "full")
    (tmp_path / "full" / "t10k-labels-idx1-ubyte.gz").rename(tmp_path / "mine" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError) as info:
        data_mod.locate(tmp_path / "mine", debian_dir=tmp_path / "debian", download_root=tmp_path / "dl")
    text = str(info.value)
    assert f"--source-dir {tmp_path / 'mine'}" in text and "dataset-fashion-mnist" in text
    missing = text.split("missing ")[1].split(" there")[0]
    assert missing == "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"
    assert not (tmp_path / "dl").exists(), "nothing may be downloaded in its place"


def test_download_failure_is_reported_with_the_other_sources(tmp_path: Path) -> None:
    # No network here: torchvision's download fails, and that failure must be part of the one error.
    with pytest.raises(DataError, match="torchvision download"):
        data_mod.locate(None, debian_dir=tmp_path / "no-debian", download_root=tmp_path / "dl")


def test_previous_download_is_reused(tmp_path: Path) -> None:
    sums = write_idx_set(tmp_path / "dl" / "FashionMNIST" / "raw")
    raw, source = data_mod.locate(None, debian_dir=tmp_path / "no-debian", download_root=tmp_path / "dl")
    assert source.startswith("earlier download") and data_mod.verify(raw, sums)


def test_wrong_checksum_names_the_file(tmp_path: Path, idx_dir) -> None:
    raw, sums = idx_dir
    bad = dict(sums, **{"t10k-labels-idx1-ubyte.gz": ("0" * 32, "1" * 32)})
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        _prepare(raw, bad, tmp_path / "out")


def test_payload_checksum_accepts_a_regzipped_file(tmp_path: Path, idx_dir) -> None:
    """Debian re-gzips upstream files: the gzip md5 differs, the payload md5 matches."""
    raw, sums = idx_dir
    name = "train-labels-idx1-ubyte.gz"
    (raw / name).write_bytes(gzip.compress(gzip.decompress((raw / name).read_bytes()), mtime=123))
    assert data_mod.verify(raw, sums)[name] == sums[name][1]


def test_corrupt_gzip_is_a_clear_error(tmp_path: Path, idx_dir) -> None:
    raw, sums = idx_dir
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a valid gzip file"):
        _prepare(raw, sums, tmp_path / "out")


def test_image_label_count_mismatch_is_an_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    sums = write_idx_set(raw)
    blob = gzip.compress(idx_bytes(np.zeros(5, np.uint8)))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(blob)
    sums["t10k-labels-idx1-ubyte.gz"] = (hashlib.md5(blob).hexdigest(), "")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: 5 labels for 60 t10k images"):
        _prepare(raw, sums, tmp_path / "out")


def test_failed_prepare_leaves_previous_outputs_intact(tmp_path: Path, idx_dir) -> None:
    raw, sums = idx_dir
    out = tmp_path / "out"
    _prepare(raw, sums, out)
    before = {p.name: p.read_bytes() for p in (out / "processed").iterdir()}
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError):
        _prepare(raw, sums, out, force=True)
    after = {p.name: p.read_bytes() for p in (out / "processed").iterdir()}
    assert after == before, "a failed run must not touch the processed data"


def test_an_output_place_that_cannot_be_written_is_a_clear_error(tmp_path: Path, idx_dir) -> None:
    raw, sums = idx_dir
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where the data directory should be")
    with pytest.raises(
        DataError,
        match=r"/file/processed: cannot write the processed data \(Not a directory\); "
        r"choose a writable directory with --out DIR",
    ) as err:
        prepare(not_a_dir, raw, val_size=60, seed=0, allow_download=False, checksums=sums)
    assert err.value.exit_code == 2 and not_a_dir.read_text().startswith("a file")


def test_second_prepare_is_a_no_op(tmp_path: Path, idx_dir) -> None:
    raw, sums = idx_dir
    out = tmp_path / "out"
    _prepare(raw, sums, out)
    mtime = (out / "processed" / "train.pt").stat().st_mtime_ns
    _prepare(raw, sums, out)
    assert (out / "processed" / "train.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "processed" / "manifest.json").read_text())["split"] == {
        "val_size": 60,
        "seed": 0,
    }


def test_load_split_names_the_command_when_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="python -m training.data"):
        load_split(tmp_path, "train")


def test_bad_val_size_is_rejected() -> None:
    with pytest.raises(DataError, match="val_size"):
        split_indices(10, 10, 0)


def test_cli_reports_missing_data_without_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(data_mod, "DEBIAN_DIR", tmp_path / "none")
    code = data_mod.main(["--source-dir", str(tmp_path / "x"), "--out", str(tmp_path / "o"), "--no-download"])
    assert code == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err


def test_cli_prepares_from_a_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    raw = tmp_path / "raw"
    sums = write_idx_set(raw, n_train=5060)
    monkeypatch.setattr(data_mod, "MD5", sums)
    code = data_mod.main(["--source-dir", str(raw), "--out", str(tmp_path / "o"), "--no-download"])
    assert code == 0, capsys.readouterr().err
    assert "train=60, val=5000, test=60" in capsys.readouterr().out


def test_cli_writes_labelled_sample_pngs(tmp_path: Path, tiny_data_root: Path) -> None:
    from PIL import Image

    code = data_mod.main(["--out", str(tiny_data_root), "--samples", str(tmp_path / "s"), "--count", "3"])
    assert code == 0
    files = sorted((tmp_path / "s").glob("*.png"))
    test = load_split(tiny_data_root, "test")
    assert len(files) == 3
    for i, path in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(path)), test.images[i].numpy())
        assert path.stem.endswith(CLASSES[int(test.labels[i])].replace("/", "-").replace(" ", "-"))
