"""Data, training, evaluation and export for the Fashion-MNIST classifier."""
