"""TorchServe's stock `ImageClassifier` handler, changed only to take 28x28 grayscale images: the
"stock TorchServe" peer of `make bench-peers`.

serving/peers.py packages this file with torch-model-archiver next to the exported model.pt,
model_meta.json and index_to_name.json, and serves it from .venv-peers: the stock VisionHandler
imports captum, which only that venv carries. Everything else is the stock handler's: its
preprocess (PIL decode, torchvision transforms, torch.stack), TorchScript loading, softmax top-5
and label mapping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class GrayscaleImageClassifier(ImageClassifier):
    """The stock transforms (Resize, CenterCrop, ToTensor, Normalize) at the exported model's input
    size and normalisation, read from its model_meta.json, after a conversion to one channel."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        meta_file = Path(context.system_properties["model_dir"]) / "model_meta.json"
        spec = json.loads(meta_file.read_text(encoding="utf-8"))["preprocess"]
        size = (spec["height"], spec["width"])
        self.image_processing = transforms.Compose(
            [
                transforms.Grayscale(num_output_channels=1),
                transforms.Resize(size),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(mean=[spec["mean"]], std=[spec["std"]]),
            ]
        )
