"""Build the TorchServe model archive (.mar) from an export directory and self-check it."""
