"""Fashion-MNIST: find the raw IDX files, verify them, split, and write tensors under data/.

    python -m training.data                         # Debian package, else torchvision download -> data/
    python -m training.data --source-dir ~/fmnist   # your own copy (flat or torchvision layout)
    python -m training.data --out data --val-size 5000 --seed 0
    python -m training.data --samples data/samples --count 10   # PNGs of real test images to query

An explicit directory is the only source used when one is given (a typo there is an
error, not a quiet switch to other data); otherwise the Debian package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), then torchvision's
download. Every file is checked against the published md5. Outputs are written
atomically (temp file + rename) and a manifest records source, checksums and counts;
a second run with the same inputs is a no-op.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from training.cli import DATA_DIR, EXIT_USAGE, StageError, run_stage

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# md5 of each file: (the .gz as published upstream, the decompressed IDX payload).
# Debian's dataset-fashion-mnist re-gzips the upstream files (the gzip header loses its
# file name and mtime), so its .gz sums differ while the IDX payload is byte-identical;
# a file is accepted when either sum matches.
MD5 = {
    "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
# Where Debian's package puts the files; the variable points elsewhere (or nowhere) if needed.
DEBIAN_DIR = Path(os.environ.get("FASHION_MNIST_DEBIAN_DIR", "/usr/share/datasets/fashion-mnist"))
DEBIAN_PACKAGE = "dataset-fashion-mnist"
REFETCH = f"delete it and fetch it again (apt-get install --reinstall {DEBIAN_PACKAGE}, or re-download)"
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
PROG = "python -m training.data"
IMAGE_SHAPE = (28, 28)
# What each file must hold once parsed: images are (N, 28, 28), labels (N,) class indices.
IDX_NDIM = {name: 3 if "-images-" in name else 1 for name in MD5}
# Everything gzip can raise on a damaged stream: a bad header (OSError), a cut-off stream (EOFError),
# a corrupt deflate block (zlib.error, which is neither).
GZIP_ERRORS = (OSError, EOFError, zlib.error)


class DataError(StageError):
    """The data could not be found or failed verification. The message says how to fix it.

    Every error about one file starts with that file's path and fits on one line. Exit code 2: the
    input is what needs fixing.
    """

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def _md5(chunks: Iterable[bytes]) -> str:
    digest = hashlib.md5()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _read_chunks(fh: BinaryIO) -> Iterable[bytes]:
    return iter(lambda: fh.read(1 << 20), b"")


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file (uncompressed bytes): big-endian magic, dims, then uint8 data."""
    if len(raw) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes); {REFETCH}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"{name}: not a uint8 IDX file (magic {raw[:4].hex()}); {REFETCH}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header; {REFETCH}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)  # Python ints: four-byte dims multiplied in int64 could wrap around
    if len(raw) - header != expected:
        raise DataError(
            f"{name}: truncated or padded: header declares {dims} ({expected} bytes), "
            f"file holds {len(raw) - header}; {REFETCH}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _candidate_dirs(root: Path) -> list[Path]:
    # Flat (Debian, the original repo) and torchvision's <root>/FashionMNIST/raw layout.
    return [root, root / "FashionMNIST" / "raw"]


def find_raw_dir(root: Path) -> Path | None:
    """The directory under `root` that holds all four .gz files, or None."""
    for cand in _candidate_dirs(root):
        if all((cand / name).is_file() for name in MD5):
            return cand
    return None


def verify(raw_dir: Path, checksums: Mapping[str, tuple[str, str]] = MD5) -> dict[str, str]:
    """Check every file's md5 (gzip or payload); raise DataError naming the first bad file."""
    sums = {}
    for name, (gz_md5, idx_md5) in checksums.items():
        path = raw_dir / name
        with open(path, "rb") as fh:
            actual = _md5(_read_chunks(fh))
        if actual != gz_md5:
            try:
                with gzip.open(path, "rb") as fh:
                    actual = _md5(_read_chunks(fh))
            except GZIP_ERRORS as exc:
                raise _gzip_error(path, exc) from exc
            if actual != idx_md5:
                raise DataError(
                    f"{path}: checksum mismatch: md5 {actual}, expected {gz_md5} (gzip) or "
                    f"{idx_md5} (payload). The file is corrupt or not Fashion-MNIST; {REFETCH}."
                )
        sums[name] = actual
    return sums


def download(root: Path) -> Path:
    """torchvision's downloader, for machines with internet. Returns the raw dir."""
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as exc:  # pragma: no cover - torchvision is pinned in requirements.txt
        raise DataError("torchvision is not installed; run `make setup`") from exc
    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)
    return root / "FashionMNIST" / "raw"


def locate(
    source_dir: Path | None,
    debian_dir: Path | None = None,
    allow_download: bool = True,
    download_root: Path = DATA_DIR / "raw",
) -> tuple[Path, str]:
    """Return (raw_dir, source_name): `source_dir` when given, else the first source with all four files."""
    if source_dir is not None:
        found = find_raw_dir(source_dir)
        if found:
            return found, f"directory {source_dir}"
        missing = [name for name in MD5 if not (source_dir / name).is_file()]
        raise DataError(
            f"Fashion-MNIST not found in --source-dir {source_dir} (data.source_dir in training): missing "
            f"{', '.join(missing)} there (and under FashionMNIST/raw in it). Put the four files there, or "
            f"leave the option out to use the Debian package {DEBIAN_PACKAGE} or a download."
        )
    tried: list[str] = []
    debian_dir = DEBIAN_DIR if debian_dir is None else debian_dir
    found = find_raw_dir(debian_dir)
    if found:
        return found, f"Debian package {DEBIAN_PACKAGE}"
    tried.append(f"{debian_dir}: not installed")
    if allow_download:
        found = find_raw_dir(download_root)
        if found:
            return found, f"earlier download in {download_root}"
        try:
            return download(download_root), "torchvision download"
        except Exception as exc:  # any network/IO failure: report it with the others
            tried.append(f"torchvision download into {download_root}: {type(exc).__name__}: {exc}")
    else:
        tried.append("download: disabled (--no-download)")
    raise DataError(
        "Fashion-MNIST not found. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nFix one of: `sudo apt-get install {DEBIAN_PACKAGE}`; pass --source-dir DIR "
        "(or data.source_dir=DIR in training) holding train/t10k-*-ubyte.gz; "
        "or run on a machine with internet access so torchvision can download it."
    )


def _gzip_error(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path}: not a valid gzip file ({exc}); {REFETCH}")


def _check_shape(array: np.ndarray, name: str, path: Path) -> None:
    """Images must be (N, 28, 28) and labels (N,) indices into CLASSES."""
    if array.ndim != IDX_NDIM[name] or (array.ndim == 3 and array.shape[1:] != IMAGE_SHAPE):
        want = f"(N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}) images" if IDX_NDIM[name] == 3 else "(N,) labels"
        raise DataError(f"{path}: holds an array of shape {array.shape}, expected {want}; {REFETCH}")
    if array.ndim == 1 and array.size and int(array.max()) >= len(CLASSES):
        raise DataError(
            f"{path}: label {int(array.max())} is out of range (classes are 0..{len(CLASSES) - 1}); {REFETCH}"
        )


def load_raw(raw_dir: Path) -> dict[str, np.ndarray]:
    """Decompress, parse and shape-check the four files; DataError names the first bad one."""
    arrays = {}
    for name in MD5:
        path = raw_dir / name
        try:
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        except GZIP_ERRORS as exc:
            raise _gzip_error(path, exc) from exc
        arrays[name] = parse_idx(raw, str(path))
        _check_shape(arrays[name], name, path)
    for prefix in ("train", "t10k"):
        n_img = len(arrays[f"{prefix}-images-idx3-ubyte.gz"])
        labels = raw_dir / f"{prefix}-labels-idx1-ubyte.gz"
        n_lab = len(arrays[labels.name])
        if n_img != n_lab:
            raise DataError(f"{labels}: {n_lab} labels for {n_img} {prefix} images; {REFETCH}")
    return arrays


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/val split of range(n): same (n, val_size, seed) -> same split."""
    if not 0 < val_size < n:
        raise DataError(f"val_size must be between 1 and {n - 1}, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` then rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prepare(
    out_dir: Path = DATA_DIR,
    source_dir: Path | None = None,
    val_size: int = 5000,
    seed: int = 0,
    *,
    debian_dir: Path | None = None,
    allow_download: bool = True,
    checksums: Mapping[str, tuple[str, str]] | None = None,
    force: bool = False,
) -> dict:
    """Write data/processed/{train,val,test}.pt and manifest.json; return the manifest."""
    processed = out_dir / "processed"
    raw_dir, source = locate(source_dir, debian_dir, allow_download, out_dir / "raw")
    sums = verify(raw_dir, MD5 if checksums is None else checksums)
    existing = processed / MANIFEST
    if existing.is_file() and not force:
        old = read_manifest(processed)
        same = old.get("checksums") == sums and old.get("split") == {"val_size": val_size, "seed": seed}
        if same and "files" in old:  # manifests from before file hashes were recorded: rebuild
            for split in SPLITS:
                check_processed(processed, split, old)
            return old
    t0 = time.perf_counter()
    arrays = load_raw(raw_dir)
    train_x, train_y = arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]
    tr, va = split_indices(len(train_y), val_size, seed)
    splits = {
        "train": (train_x[tr], train_y[tr]),
        "val": (train_x[va], train_y[va]),
        "test": (arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]),
    }
    try:
        processed.mkdir(parents=True, exist_ok=True)
        # The manifest goes last and is removed first: its presence means the tensors are complete.
        existing.unlink(missing_ok=True)
        files = {}
        for name, (x, y) in splits.items():
            payload = {"images": torch.from_numpy(x.copy()), "labels": torch.from_numpy(y.astype(np.int64))}
            _atomic_write(processed / f"{name}.pt", lambda tmp, p=payload: torch.save(p, tmp))
            files[f"{name}.pt"] = _sha256(processed / f"{name}.pt")
        manifest = {
            "dataset": "fashion-mnist",
            "source": source,
            "raw_dir": str(raw_dir),
            "checksums": sums,
            "files": files,  # sha256 of each tensor file: readers refuse files changed since
            "split": {"val_size": val_size, "seed": seed},
            "counts": {name: len(y) for name, (_, y) in splits.items()},
            "classes": CLASSES,
            "prepare_seconds": round(time.perf_counter() - t0, 3),
        }
        _atomic_write(existing, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    except OSError as exc:  # not a directory, read-only, disk full: the output place needs fixing
        raise DataError(
            f"{processed}: cannot write the processed data ({exc.strerror or exc}); choose a writable "
            "directory with --out DIR (data.root=DIR in training)"
        ) from exc
    return manifest


def dvc_data_hash(out_dir: Path, repo: Path = Path(".")) -> str | None:
    """DVC's hash of <out_dir>/processed as `dvc.lock` records it, checked against the files on disk.

    None when the split was not produced by the DVC pipeline (no lock entry or cached listing), or
    when any file differs from what DVC recorded: a hash is only written where it is true.
    """
    lock, processed = repo / "dvc.lock", out_dir / "processed"
    if not lock.is_file():
        return None
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    target = processed.resolve()
    recorded = next(
        (
            out["md5"]
            for stage in stages.values()
            for out in stage.get("outs", [])
            if (repo / out["path"]).resolve() == target and str(out.get("md5", "")).endswith(".dir")
        ),
        None,
    )
    if recorded is None:
        return None
    # DVC 3's cache keeps a directory's file list as JSON under files/md5/<2 hex>/<rest>.
    listing = repo / ".dvc" / "cache" / "files" / "md5" / recorded[:2] / recorded[2:]
    if not listing.is_file():
        return None
    entries = json.loads(listing.read_text())
    on_disk = sorted(p.relative_to(processed).as_posix() for p in processed.rglob("*") if p.is_file())
    if on_disk != sorted(entry["relpath"] for entry in entries):
        return None
    for entry in entries:
        with open(processed / entry["relpath"], "rb") as fh:
            if _md5(_read_chunks(fh)) != entry["md5"]:
                return None
    return "md5:" + recorded.removesuffix(".dir")


def load_split(out_dir: Path, name: str) -> Split:
    """Load one processed split; says which command creates it when it is missing."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    processed = out_dir / "processed"
    path = processed / f"{name}.pt"
    if not (processed / MANIFEST).is_file() or not path.is_file():
        raise DataError(f"{path} not found; run `python -m training.data --out {out_dir}` first")
    manifest = read_manifest(processed)
    if "files" not in manifest:
        raise DataError(
            f"{processed / MANIFEST}: written by an older version of this step; "
            f"run `python -m training.data --out {out_dir}` to rebuild it"
        )
    check_processed(processed, name, manifest)
    blob = torch.load(path, weights_only=True)
    return Split(blob["images"], blob["labels"])


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _rebuild_hint(processed: Path) -> str:
    return f"rebuild it with `python -m training.data --out {processed.parent} --force`"


def read_manifest(processed: Path) -> dict:
    """The manifest of a processed directory; DataError naming it if it is not one this step wrote."""
    path = processed / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise DataError(f"{path}: not a readable manifest ({exc}); {_rebuild_hint(processed)}") from exc
    shape = {"source": str, "raw_dir": str, "checksums": dict, "split": dict, "counts": dict}
    ok = isinstance(manifest, dict) and all(isinstance(manifest.get(k), t) for k, t in shape.items())
    files = manifest.get("files", {}) if ok else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise DataError(f"{path}: not a manifest written by this step; {_rebuild_hint(processed)}")
    return manifest


def check_processed(processed: Path, split: str, manifest: dict) -> None:
    """Refuse a tensor file that differs from what `prepare` wrote (edited, truncated, swapped)."""
    path = processed / f"{split}.pt"
    expected = manifest["files"].get(path.name)
    try:
        actual = _sha256(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc}); {_rebuild_hint(processed)}") from exc
    if actual != expected:
        raise DataError(
            f"{path}: changed since `python -m training.data` wrote it (sha256 {actual[:12]}..., "
            f"manifest says {str(expected)[:12]}...); {_rebuild_hint(processed)}"
        )


def write_samples(out_dir: Path, dest: Path, count: int) -> list[tuple[Path, str]]:
    """Save the first `count` test images as PNG; the file name carries the true label."""
    from PIL import Image

    test = load_split(out_dir, "test")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(count, len(test))):
        label = CLASSES[int(test.labels[i])]
        path = dest / f"test{i:05d}_{label.replace('/', '-').replace(' ', '-')}.png"
        Image.fromarray(test.images[i].numpy(), mode="L").save(path)
        written.append((path, label))
    return written


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source-dir", type=Path, help="directory holding the four *-ubyte.gz files")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output root (default: <repo>/data)")
    parser.add_argument(
        "--val-size", type=int, default=5000, help="validation images held out (default 5000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--no-download", action="store_true", help="never try the internet")
    parser.add_argument("--force", action="store_true", help="rewrite outputs even if up to date")
    parser.add_argument("--samples", type=Path, help="also save test images as PNG files into this directory")
    parser.add_argument("--count", type=int, default=10, help="how many --samples (default 10)")
    args = parser.parse_args(None if argv is None else list(argv))
    t0 = time.perf_counter()

    def run() -> None:
        manifest = prepare(
            args.out,
            args.source_dir,
            args.val_size,
            args.seed,
            allow_download=not args.no_download,
            force=args.force,
        )
        counts = ", ".join(f"{k}={v}" for k, v in manifest["counts"].items())
        print(
            f"Fashion-MNIST from {manifest['source']}: {counts} -> {args.out / 'processed'} "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        if args.samples:
            written = write_samples(args.out, args.samples, args.count)
            print(f"{len(written)} test images as PNG -> {args.samples}")

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
