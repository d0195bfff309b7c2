"""What a model computes, as a hash: compare models by weights and metadata, never by file bytes.

Two TorchScript files of the same weights differ byte for byte (scripting writes source, debug
info and zip entries that vary between runs), so a file checksum calls them different models.
`weights_digest` hashes every parameter and buffer instead; `model_version` combines it with the
metadata that changes the served answers, giving the short version string TorchServe registers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from handler.variants import VARIANTS

# model_meta.json fields that change what the model answers; timestamps, git commit and metrics don't.
IDENTITY_FIELDS = ("architecture", "preprocess", "classes")
VERSION_LENGTH = 12  # hex digits: 48 bits, ample for the versions of one model name


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, values), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        # contiguous(): a channels_last copy of the same weights hashes the same.
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def model_version(weights: str, meta: Mapping[str, Any]) -> str:
    """A version derived from what the model was built from: weights digest + IDENTITY_FIELDS."""
    identity = {"weights": weights, **{key: meta.get(key) for key in IDENTITY_FIELDS}}
    # A quantized variant of the same weights answers differently: another model. The fp32 variants
    # only load the same file differently, so they (and metadata older than variants) keep the version.
    variant = VARIANTS.get(meta.get("variant") or "")
    if variant is not None and variant.quantized:
        identity["variant"] = variant.name
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:VERSION_LENGTH]
