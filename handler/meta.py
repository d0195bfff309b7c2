"""model_meta.json, the one description of an exported model: written by export, read by everything else.

`python -m training.export` saves a `ModelMeta`; offline evaluation, `python -m archive.build` and the
TorchServe handler load it with `ModelMeta.load`, which validates it. Its fields are declared here and
nowhere else; the default name is `handler.MODEL_NAME`. This module ships inside the `.mar`
(as `handler/meta.py`), so it uses only the standard library and the handler package.

    >>> meta = ModelMeta.load(Path("artifacts/model"))   # MetaError saying what to re-run if it is wrong
    >>> meta.name, meta.version, meta.classes[0], meta.preprocess.input_shape
    ('fashion_mnist', '1.0', 'T-shirt/top', [1, 28, 28])
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from handler import MODEL_NAME
from handler.postprocess import class_names
from handler.preprocess import PreprocessSpec
from handler.variants import EXPORTED_VARIANT, VARIANTS

META_FILE = "model_meta.json"
INDEX_FILE = "index_to_name.json"  # TorchServe's conventional class map, written from `classes`
# Names and versions appear in URLs (/predictions/<name>/<version>) and in archive file names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REEXPORT = "re-export the model with `python -m training.export`"


class MetaError(ValueError):
    """model_meta.json is missing, unreadable or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelMeta:
    """What serving and evaluation need to know about one exported model."""

    version: str
    classes: list[str]
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    name: str = MODEL_NAME
    architecture: dict[str, Any] = field(default_factory=dict)  # class, hyperparameters, num_params
    metrics: dict[str, float] = field(default_factory=dict)  # test_accuracy, val_accuracy
    # Training-input statistics for drift checks. A plain dict: new statistics need no schema change.
    reference_stats: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    git_commit: str = "unknown"
    config_hash: str = ""
    torch_version: str = ""
    source: dict[str, str] = field(default_factory=dict)  # run dir and checkpoint it came from
    # Identity and provenance (the DVC pipeline): DVC's hash of the processed split the model was
    # trained on (None when the split was not made by `dvc repro`), and the sha256 of its weights,
    # from which training.export derives the version (model/fingerprint.py).
    data_hash: str | None = None
    weights_digest: str = ""
    # How the model file is loaded (handler/variants.py): the export is "fp32"; `python -m
    # archive.build --variant` writes the variant it archived into the archive's copy.
    variant: str = EXPORTED_VARIANT

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MetaError unless the name, version and classes are usable by serving."""
        for what, value in (("name", self.name), ("version", self.version)):
            if not isinstance(value, str) or not NAME_PATTERN.match(value):
                raise MetaError(f"model {what} {value!r} must match {NAME_PATTERN.pattern}")
        classes = self.classes
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise MetaError(f"classes must be a non-empty list of names, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise MetaError(f"class names must be unique, got {classes}")
        if self.variant not in VARIANTS:
            raise MetaError(f"variant {self.variant!r} is not one of {list(VARIANTS)} (handler/variants.py)")
        for what in ("architecture", "metrics", "reference_stats", "source"):
            if not isinstance(getattr(self, what), dict):
                raise MetaError(f"{what} must be a JSON object, got {getattr(self, what)!r}")

    @property
    def index_to_name(self) -> dict[str, str]:
        return {str(i): name for i, name in enumerate(self.classes)}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_meta()
        return data

    @classmethod
    def from_json(cls, data: Any) -> ModelMeta:
        """Validate a parsed model_meta.json; MetaError names the first problem."""
        if not isinstance(data, dict):
            raise MetaError(f"expected a JSON object, got {type(data).__name__}")
        missing = sorted({"version", "classes", "preprocess"} - set(data))
        if missing:
            raise MetaError(f"lacks {missing}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise MetaError(f"has fields {unknown} that handler/meta.py does not define")
        try:
            spec = PreprocessSpec.from_meta(data["preprocess"])
        except (AttributeError, KeyError, TypeError) as exc:
            # args[0]: a KeyError's str() would wrap the message in quotes
            raise MetaError(f"bad preprocess section: {exc.args[0] if exc.args else exc}") from exc
        return cls(**{**data, "preprocess": spec})

    @classmethod
    def load(cls, directory: Path) -> ModelMeta:
        """Read directory/model_meta.json and check index_to_name.json beside it lists the same classes."""
        path, index_path = directory / META_FILE, directory / INDEX_FILE
        try:
            meta = cls.from_json(_read_json(path))
        except MetaError as exc:
            raise MetaError(f"{path}: {exc}; {REEXPORT}") from exc
        try:
            classes = class_names(_read_json(index_path))
        except (AttributeError, TypeError, ValueError) as exc:  # ValueError: a gap in the keys, or MetaError
            raise MetaError(f"{index_path}: {exc}; {REEXPORT}") from exc
        if classes != meta.classes:
            raise MetaError(
                f"{index_path} lists {classes} but {path} lists {meta.classes}; "
                f"both must come from the same export: {REEXPORT}"
            )
        return meta

    def save(self, directory: Path) -> None:
        """Write model_meta.json and index_to_name.json into `directory`."""
        (directory / META_FILE).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        (directory / INDEX_FILE).write_text(json.dumps(self.index_to_name, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MetaError("not found") from exc
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise MetaError(f"is not valid JSON ({exc})") from exc
