"""TorchServe handler for the Fashion-MNIST classifier and its pure pre/post functions."""

# The model's name: the archive's file name, the URL path /predictions/<MODEL_NAME> and model_meta.json's
# "name". It lives here, in a module that imports nothing, so the serving command lines read it
# without loading torch.
MODEL_NAME = "fashion_mnist"
