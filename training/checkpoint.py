"""A training checkpoint read without Lightning: the network and the preprocessing it was trained with.

    from training.checkpoint import load_checkpoint
    net, spec = load_checkpoint(Path("outputs/train/latest/checkpoints/best.ckpt"))

training.train's LightningModule builds its network with `build_net`, and training.export reads
the best checkpoint with `load_checkpoint`. So exporting does not import Lightning and torchmetrics,
which cost about 6 CPU-s of a command's start.
"""

from __future__ import annotations

from pathlib import Path

import torch

from handler.preprocess import PreprocessSpec
from model import FashionCNN
from training.config import ModelConfig
from training.data import CLASSES

# The LightningModule holds the network as `net`; its other state (metrics) is not the model's.
NET_PREFIX = "net."


def build_net(model: ModelConfig) -> FashionCNN:
    """The classifier a model config describes, freshly initialised."""
    return FashionCNN(
        num_classes=len(CLASSES),
        width=model.width,
        depth=model.depth,
        dropout=model.dropout,
        hidden=model.hidden,
        stem_convs=model.stem_convs,
        flip_tta=model.flip_tta,
    )


class CheckpointError(ValueError):
    """The file is not a checkpoint training.train wrote, or is damaged; the message says which."""


def load_checkpoint(path: Path) -> tuple[FashionCNN, PreprocessSpec]:
    """The network of a checkpoint training.train wrote (in eval mode, on the CPU), and its preprocessing.

    Raises CheckpointError, naming the file and the cause, for anything else."""
    try:
        # weights_only: the file holds tensors and plain values only (the hyper-parameters are dicts).
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hparams = ckpt["hyper_parameters"]
        net = build_net(ModelConfig(**hparams["model"]))
        net.load_state_dict(
            {k.removeprefix(NET_PREFIX): v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
        )
        spec = PreprocessSpec.from_meta(hparams["preprocess"])
    # Whatever a damaged or foreign file raises: unpickling, zip, missing keys, shapes, field names.
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable training checkpoint ({type(exc).__name__}: {exc}); "
            "train again with `python -m training.train`, or pass another run"
        ) from exc
    return net.eval(), spec
