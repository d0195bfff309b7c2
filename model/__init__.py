"""The classifier architecture. `FashionCNN` is plain torch.nn and scriptable."""

from model.cnn import FashionCNN, count_parameters
from model.fingerprint import model_version, weights_digest

__all__ = ["FashionCNN", "count_parameters", "model_version", "weights_digest"]
