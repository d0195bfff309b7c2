"""The classifier architecture. `FashionCNN` is plain torch.nn and scriptable."""

from model.cnn import FashionCNN, count_parameters

__all__ = ["FashionCNN", "count_parameters"]
