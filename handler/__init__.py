"""TorchServe handler for the Fashion-MNIST classifier and its pure pre/post functions."""
