"""Property tests: no damaged data file makes `python -m training.data` print a traceback or half-write.

Raw files are damaged two ways. As delivered (`pinned`), the md5 check catches most changes, so the
same damage is also run with the damaged files' own checksums supplied (`parse`): then nothing stops
the bytes before gzip and the IDX parser, which must refuse them on their own. Processed tensors
are damaged between two runs. Every run goes through the CLI's main() on tiny generated files.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import write_idx_set
from training import data as data_mod

FILES = sorted(data_mod.MD5)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, str]]]:
    raw = tmp_path_factory.mktemp("clean") / "raw"
    return raw, write_idx_set(raw, n_train=20, n_test=10)


def flip_bits(blob: bytes, offsets: list[int]) -> bytes:
    out = bytearray(blob)
    for offset in offsets:
        out[offset % len(out)] ^= 1 << (offset % 8)
    return bytes(out)


def regzip(blob: bytes, edit) -> bytes:
    """Change the IDX payload inside a .gz and compress it again: a well-formed gzip of bad IDX data."""
    return gzip.compress(edit(gzip.decompress(blob)), mtime=0)


def wrong_dims(raw: bytes) -> bytes:
    """Keep the payload, reshape the header: 28x28 images declared as 14x56, labels as a 2-D array."""
    ndim = raw[3]
    if ndim == 3:
        n = struct.unpack(">I", raw[4:8])[0]
        return raw[:4] + struct.pack(">3I", n, 14, 56) + raw[16:]
    n = struct.unpack(">I", raw[4:8])[0]
    return raw[:3] + bytes([3]) + struct.pack(">3I", n, 1, 1) + raw[8:]


def labels_out_of_range(raw: bytes) -> bytes:
    labels = np.frombuffer(raw, np.uint8, offset=8).copy()
    labels[len(labels) // 2] = 10 + labels[0] % 246
    return raw[:8] + labels.tobytes()


VALID_MAGIC = (b"\x00\x00\x08\x01", b"\x00\x00\x08\x03")
# Each draw is a function from the clean .gz bytes to damaged ones.
DAMAGE = st.one_of(
    st.lists(st.integers(0, 1 << 30), min_size=1, max_size=8).map(lambda o: lambda b: flip_bits(b, o)),
    st.floats(0, 0.999).map(lambda f: lambda b: b[: int(len(b) * f)]),
    st.just(lambda b: b""),
    st.binary(min_size=4, max_size=4)
    .filter(lambda magic: magic not in VALID_MAGIC)
    .map(lambda magic: lambda b: regzip(b, lambda raw: magic + raw[4:])),
    st.just(lambda b: regzip(b, wrong_dims)),
    st.integers(1, 50).map(lambda k: lambda b: regzip(b, lambda raw: raw[:-k])),
    st.integers(1, 50).map(lambda k: lambda b: regzip(b, lambda raw: raw + b"\x00" * k)),
)


@contextmanager
def workspace(clean_raw: Path) -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        shutil.copytree(clean_raw, raw)
        yield raw, Path(tmp) / "out"


def run_cli(raw: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = data_mod.main(["--source-dir", str(raw), "--out", str(out), "--val-size", "5", "--no-download"])
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, named: Path) -> None:
    assert code == 2, f"expected exit 2, got {code}: {err}"
    assert "Traceback" not in err and err.count("\n") == 1, f"expected one line, got:\n{err}"
    assert err.startswith(f"{data_mod.PROG}: error: {named}"), f"the error must name {named}: {err}"


def payload(blob: bytes) -> bytes | None:
    """What gzip makes of `blob`, or None: any failure means "not the original data"."""
    try:
        return gzip.decompress(blob)
    except Exception:  # zlib.error, EOFError, BadGzipFile...: which one does not matter here
        return None


def md5s(path: Path) -> tuple[str, str]:
    """A checksum pair that accepts `path` as it now is (its .gz md5 matches even if it is not gzip)."""
    blob = path.read_bytes()
    data = payload(blob)
    return hashlib.md5(blob).hexdigest(), "" if data is None else hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("checks", ["pinned", "parse"])
@SETTINGS
@given(name=st.sampled_from(FILES), damage=DAMAGE)
def test_damaged_raw_file_is_one_clear_line_and_writes_nothing(
    clean, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], checks: str, name: str, damage
) -> None:
    clean_raw, sums = clean
    with workspace(clean_raw) as (raw, out):
        original = (raw / name).read_bytes()
        (raw / name).write_bytes(damage(original))
        payload_intact = payload((raw / name).read_bytes()) == payload(original)
        pinned = dict(sums) if checks == "pinned" else {**sums, name: md5s(raw / name)}
        monkeypatch.setattr(data_mod, "MD5", pinned)
        code, err = run_cli(raw, out, capsys)
        if payload_intact:  # e.g. a flipped bit in the gzip header's mtime: the data itself is fine
            assert code == 0, err
            return
        assert_clean_failure(code, err, raw / name)
        assert not out.exists() or not any(out.rglob("*")), f"a failed run wrote {list(out.rglob('*'))}"


def test_labels_out_of_range_are_refused(clean, monkeypatch, capsys) -> None:
    clean_raw, sums = clean
    for name in (n for n in FILES if "labels" in n):
        with workspace(clean_raw) as (raw, out):
            (raw / name).write_bytes(regzip((raw / name).read_bytes(), labels_out_of_range))
            monkeypatch.setattr(data_mod, "MD5", {**sums, name: md5s(raw / name)})
            code, err = run_cli(raw, out, capsys)
            assert_clean_failure(code, err, raw / name)
            assert "out of range" in err
            assert not out.exists()


PROCESSED = ["train.pt", "val.pt", "test.pt", data_mod.MANIFEST]
TAMPER = st.one_of(
    st.lists(st.integers(0, 1 << 30), min_size=1, max_size=8).map(lambda o: ("flip", o)),
    st.floats(0, 0.999).map(lambda f: ("truncate", f)),
    st.just(("empty", None)),
    st.sampled_from(PROCESSED).map(lambda other: ("replace", other)),
)


@SETTINGS
@given(target=st.sampled_from(PROCESSED), tamper=TAMPER)
def test_tampered_processed_files_are_refused_not_used(
    clean, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], target: str, tamper
) -> None:
    clean_raw, sums = clean
    monkeypatch.setattr(data_mod, "MD5", sums)
    with workspace(clean_raw) as (raw, out):
        assert run_cli(raw, out, capsys)[0] == 0
        processed = out / "processed"
        good = {p.name: p.read_bytes() for p in processed.iterdir()}
        kind, arg = tamper
        blob = good[target]
        changed = {
            "flip": lambda: flip_bits(blob, arg),
            "truncate": lambda: blob[: int(len(blob) * arg)],
            "empty": lambda: b"",
            "replace": lambda: good[arg],
        }[kind]()
        (processed / target).write_bytes(changed)
        before = {p.name: p.read_bytes() for p in processed.iterdir()}
        code, err = run_cli(raw, out, capsys)
        if changed == good[target]:  # "replaced" by itself
            assert code == 0, f"an untouched data directory was refused: {err}"
            return
        if code == 0:
            # Only a manifest edit that still parses and changes a recorded input (a checksum, the
            # split) can get here: then the inputs differ from the record, and a rebuild is right.
            assert target == data_mod.MANIFEST, f"a changed {target} was used: {err}"
            for split in data_mod.SPLITS:
                data_mod.load_split(out, split)
            return
        assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert f"{processed}/" in err, f"the error must name a file under {processed}: {err}"
        if target != data_mod.MANIFEST:
            assert err.startswith(f"{data_mod.PROG}: error: {processed / target}"), err
        after = {p.name: p.read_bytes() for p in processed.iterdir()}
        assert after == before, "a refused run must leave the directory as it found it"
        splits = data_mod.SPLITS if target == data_mod.MANIFEST else [target.removesuffix(".pt")]
        with pytest.raises(data_mod.DataError):
            for split in splits:
                data_mod.load_split(out, split)
