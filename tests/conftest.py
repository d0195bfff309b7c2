"""Shared fixtures: tiny generated IDX data, the real Fashion-MNIST, and a small trained export.

The expensive fixtures are session-scoped and built once per test run, however many pytest-xdist
workers share it (`build_once`): `real_data_root` (the Debian package's files, processed into a temp
dir), `trained_run` (a briefly trained real model), `export_dir` (its export by the project's own
export step) and `mar_file` (archived with the project's own archive step).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from ts.service import Service

from archive.build import ServingConfig
from archive.selfcheck import export_service
from handler.meta import ModelMeta
from model import FashionCNN
from serving.client import Client
from serving.server import Instance
from serving.tsconfig import parse_properties
from training import data as data_mod
from training.config import register_configs
from training.data import CLASSES
from training.train import CONFIG_DIR

register_configs()


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadscope` for `make test`'s parallel phase, with every Docker module in one scope.

    A module's tests stay on one worker, so its module-scoped servers start once. The modules with a
    `container` test share image tags (tests/containers.build_image builds each once per process),
    so they run on one worker: two workers would build the same tag at once, each with its own
    archive. (xdist's own xdist_group marker does nothing under pytest 9: it rewrites a node id
    that pytest 9 no longer reads.)
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    tests = Path(__file__).resolve().parent
    docker = {
        f"tests/{path.name}" for path in tests.glob("test_*.py") if "mark.container" in path.read_text()
    }

    class DockerTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "docker" if module in docker else module

    return DockerTogether(config, log)


def make_random_export(
    directory: Path,
    *,
    model_classes: int = 10,
    classes: list[str] = CLASSES,
    version: str = "1.0",
    seed: int = 0,
) -> Path:
    """An export laid out like training.export's (unfrozen TorchScript + metadata), random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = FashionCNN(num_classes=model_classes, width=8, depth=1).eval()
    torch.jit.script(model).save(str(directory / "model.pt"))
    architecture = {"class": "FashionCNN", "width": 8, "depth": 1, "dropout": 0.25}
    ModelMeta(version=version, classes=list(classes), architecture=architecture).save(directory)
    return directory


def load_handler(model_dir: Path) -> Service:
    """The repository's handler behind TorchServe's own Service, initialised like a worker does it.

    Batches go through it with archive.selfcheck.predict: TorchServe's frame decoding, the handler,
    and TorchServe's per-request status encoding, with no JVM.
    """
    return export_service(model_dir)[0]


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (what Fashion-MNIST ships)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(
    directory: Path, n_train: int = 240, n_test: int = 60, seed: int = 0
) -> dict[str, tuple[str, str]]:
    """Write the four *-ubyte.gz files with learnable synthetic images; return their md5 map.

    Each class is a bright horizontal band at a class-specific row, so even a few
    training steps learn it.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 230
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte.gz"
            raw = idx_bytes(array)
            blob = gzip.compress(raw, mtime=0)
            (directory / name).write_bytes(blob)
            checksums[name] = (hashlib.md5(blob).hexdigest(), hashlib.md5(raw).hexdigest())
    return checksums


@pytest.fixture
def idx_dir(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A flat directory of tiny synthetic IDX files and their checksums."""
    raw = tmp_path / "raw"
    return raw, write_idx_set(raw)


@pytest.fixture
def tiny_data_root(tmp_path: Path, idx_dir) -> Path:
    """Processed splits of the tiny synthetic set (60 val, 180 train, 60 test)."""
    raw, sums = idx_dir
    root = tmp_path / "data"
    data_mod.prepare(root, raw, val_size=60, seed=0, allow_download=False, checksums=sums)
    return root


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose configs/train.yaml with overrides, as the CLI would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides))

    return _compose


# make test sets this to one directory for both of its pytest runs (the parallel and the solo phase),
# so they share the fixtures build_once makes; it clears the directory first.
SHARED_ENV = "FASHION_TEST_SHARED"


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(path)` once per test run, its `path` shared by every pytest-xdist worker of that run.

    Session fixtures are per process, so under xdist each worker would otherwise train and archive
    its own copy: on 2 cores that doubles the CPU the slowest fixtures take. The first worker to ask
    builds under a file lock while the others wait; a build that raised leaves no marker, so the next
    worker to ask retries from scratch (and reports its own failure). Only for read-only results.
    The directory is $FASHION_TEST_SHARED when set, else one in the run's base temp.
    """
    if shared := os.environ.get(SHARED_ENV):
        root = Path(shared)
    else:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # the run's base temp; each worker's own is a directory inside it
        root = root / "shared"
    path, done = root / name, root / f"{name}.done"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def real_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Fashion-MNIST (Debian package), processed into a temp dir."""
    if data_mod.find_raw_dir(data_mod.DEBIAN_DIR) is None:
        pytest.fail(
            f"{data_mod.DEBIAN_DIR} is empty: run `scripts/setup.sh` (installs dataset-fashion-mnist)"
        )
    return build_once(
        tmp_path_factory, "fmnist", lambda root: data_mod.prepare(root, None, allow_download=False)
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, real_data_root: Path) -> Path:
    """A real model briefly trained on the real data (~85% accuracy): enough to test serving parity."""
    from training.train import train

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"data.root={real_data_root}",
                "model.width=16",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=120",
                "trainer.limit_val_batches=2",
                "trainer.progress_bar=false",
                "logger=csv",
            ],
        )
    return build_once(tmp_path_factory, "run", lambda run: train(cfg, run))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, real_data_root: Path) -> Path:
    """The project's own export of `trained_run`: model.pt, model_meta.json, index_to_name.json."""
    from training.export import export

    return build_once(
        tmp_path_factory,
        "export",
        lambda out: export(trained_run, out, version="1.0", data_root=real_data_root),
    )


@pytest.fixture(scope="session")
def mar_file(tmp_path_factory: pytest.TempPathFactory, export_dir: Path, real_data_root: Path) -> Path:
    """`export_dir` archived by the project's own archive step (self-checked before it is published),
    as the default variant (archive/variants.py)."""
    from archive.build import build

    store = build_once(
        tmp_path_factory, "model_store", lambda out: build(export_dir, out, data_root=real_data_root)
    )
    return store / f"{ModelMeta.load(export_dir).name}.mar"


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory, mar_file: Path) -> Path:
    """`mar_file` unpacked: the files the server answers from, for offline evaluation of the same artifact."""

    def unpack(out: Path) -> None:
        with zipfile.ZipFile(mar_file) as archive:
            archive.extractall(out)

    return build_once(tmp_path_factory, "served", unpack)


# --- a real TorchServe per deploy target (test_hostile, test_grpc) -----------------------------------

# The model's batching on those servers: a batch leaves the queue when it holds 8 requests or after
# 4 s, so 8 answers well before 4 s prove that 8 requests went through the worker as one batch.
BATCH_SIZE = 8
BATCH_DELAY_MS = 4000
BATCHING = ServingConfig(min_workers=1, max_workers=1, batch_size=BATCH_SIZE, max_batch_delay=BATCH_DELAY_MS)


@dataclass(frozen=True)
class Served:
    """A running server: a local variant of one target's config (tests.reliability.TARGET_CONFIGS)."""

    target: str
    instance: Instance
    client: Client
    export: Path  # the random-weights export its archive holds (for offline answers)
    worker_decodes: bool  # decode_input_request is on: the worker parses JSON and text bodies itself


# Session scope: test_hostile and test_grpc share each target's server (one JVM start each); pytest
# orders the tests so that one target's server is up at a time. A test must leave it as it found it.
@pytest.fixture(scope="session", params=["local"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The random-weights archive (batch 8, 4 s delay, one worker) served with a target's config.

    Parametrize with `@pytest.mark.parametrize("served", [...targets], indirect=True)`; default "local".
    """
    from tests.reliability import TARGET_CONFIGS, random_archive, serving_store_copy

    archive = random_archive(tmp_path_factory, BATCHING)
    config = TARGET_CONFIGS[request.param]()
    with serving_store_copy(tmp_path_factory, archive, request.param, config=config) as instance:
        client = Client.for_instance(instance)
        described = client.describe()[0]
        assert (described["batchSize"], described["maxBatchDelay"]) == (BATCH_SIZE, BATCH_DELAY_MS), described
        decodes = parse_properties(config).get("decode_input_request", "true").lower() == "true"
        yield Served(request.param, instance, client, archive.export, decodes)


@pytest.fixture(scope="session")
def offline(served: Served) -> Callable[[bytes], torch.Tensor]:
    """image bytes -> the served export's class probabilities, evaluated in-process (cached)."""
    from tests.live_server import offline_probabilities

    cache: dict[bytes, torch.Tensor] = {}

    def probabilities(image: bytes) -> torch.Tensor:
        if image not in cache:
            cache[image] = offline_probabilities(served.export, [image])[0]
        return cache[image]

    return probabilities
