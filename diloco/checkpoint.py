"""Model weights as safetensors bytes with JSON metadata (``{"arch", "config", ...}``)."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

META_KEY = "agora"


class CheckpointError(ValueError):
    """Checkpoint bytes are not a valid Agora safetensors checkpoint."""


def save_weights(state: dict[str, Tensor], meta: dict) -> bytes:
    """Safetensors bytes of ``state`` (CPU, contiguous) with ``meta`` as JSON under metadata key ``agora``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    # One metadata key only: safetensors writes the metadata map in arbitrary order, and a single key
    # keeps the bytes (hence the content hash) identical for identical weights and meta.
    return st_save(tensors, metadata={META_KEY: text})


def load_weights(data: bytes) -> tuple[dict[str, Tensor], dict]:
    """Inverse of :func:`save_weights`; raises :class:`CheckpointError` on malformed bytes."""
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for every malformed input
        raise CheckpointError(f"checkpoint is not a safetensors file: {exc}") from exc
    from diloco.codecs import _read_metadata

    try:
        meta_text = _read_metadata(bytes(data)).get(META_KEY, "{}")
        meta = json.loads(meta_text)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError("checkpoint metadata must be a JSON object")
    for name, t in tensors.items():
        if t.dtype.is_floating_point and not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint tensor {name} has non-finite values")
    return tensors, meta


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
