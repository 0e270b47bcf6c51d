"""Published deltas: each accepted round's step, stored next to its checkpoint, so that an agent holding the
round's input checkpoint downloads the step (``GET /api/v1/checkpoints/<sha256>/delta``) instead of the
new checkpoint, applies it (``diloco.sparse.apply_published_delta``), writes the checkpoint bytes with the metadata the
step carries and checks their sha256.

The delta is content addressed in blob storage (``deltas/<sha[:2]>/<sha>.bin``) and named by the new
checkpoint's row (``Checkpoint.metrics["published_delta"]``: ``from``, ``sha256``, ``size``). Building it
is tensor work done outside transactions, by the aggregation attempt that wrote the checkpoint;
recording it happens in the transaction that commits the round. A checkpoint without a delta (the first,
one whose step no delta rebuilds exactly, or a run from before deltas) is simply downloaded whole.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from diloco.checkpoint import sha256_hex
from diloco.codecs import SPARSE_BITS, CodecError
from diloco.sparse import apply_published_delta, encode_published_delta
from training import blobs
from training.models import Checkpoint

log = logging.getLogger(__name__)

METRICS_KEY = "published_delta"


def publish_mode(diloco: dict) -> str | None:
    """How the outer step of a run is rounded so that it can be published (``OuterSpec.publish``): runs with
    a sparse codec (their step is as sparse as the union of the updates) round it per chunk to int8 times a
    power of two and carry what the rounding leaves out to the next step (``diloco.outer``); none else."""
    return "int8" if diloco.get("compression") in SPARSE_BITS else None


def delta_storage_name(sha256: str) -> str:
    return f"deltas/{sha256[:2]}/{sha256}.bin"


def delta_publish(*, state_in: dict[str, Tensor], state_out: dict[str, Tensor], step: dict[str, Tensor] | None,
                  sha_in: str, sha_out: str, meta_out: dict, checkpoint_size: int) -> dict | None:
    """Build and store the published step from checkpoint ``sha_in`` to ``sha_out`` (``step``: the exact
    ``d`` the outer optimizer subtracted, ``state_out = state_in − d``); returns its record (``from``,
    ``sha256``, ``size``), or None when there is no step or it would not be smaller than the checkpoint.

    The file carries ``{"from", "to", "checkpoint_meta"}`` so an agent rebuilds the checkpoint's exact
    bytes. Before storing it, it is applied here and checked bitwise against ``state_out``. Safe to repeat
    (content addressed) and meant to run outside transactions; never fails the round."""
    if step is None or set(step) != set(state_in):
        return None
    try:
        data = encode_published_delta(step, meta={"from": sha_in, "to": sha_out, "checkpoint_meta": meta_out})
        if len(data) >= checkpoint_size:
            return None
        rebuilt = apply_published_delta(state_in, data)
        if any(not torch.equal(rebuilt[k], state_out[k].to("cpu")) for k in state_out):
            log.warning("the published step to %s does not rebuild it bitwise; agents download the checkpoint",
                        sha_out[:12])
            return None
    except (CodecError, ValueError, RuntimeError) as exc:
        log.warning("no published step to %s: %s", sha_out[:12], exc)
        return None
    sha = sha256_hex(data)
    blobs.blob_write(delta_storage_name(sha), data, content_addressed=True, sha256=sha)
    return {"from": sha_in, "sha256": sha, "size": len(data)}


def delta_record(*, checkpoint: Checkpoint, delta: dict | None) -> None:
    """Name the published step on the new checkpoint's row (inside the round's commit)."""
    if not delta or delta_of(checkpoint):
        return
    checkpoint.metrics = {**(checkpoint.metrics or {}), METRICS_KEY: delta}
    checkpoint.save(update_fields=["metrics"])


def delta_of(checkpoint: Checkpoint | None) -> dict | None:
    """The published step that rebuilds ``checkpoint`` (``from``, ``sha256``, ``size``), if it has one."""
    if checkpoint is None or not isinstance(checkpoint.metrics, dict):
        return None
    delta = checkpoint.metrics.get(METRICS_KEY)
    return delta if isinstance(delta, dict) and delta.get("sha256") and delta.get("from") else None


def delta_fields(checkpoint: Checkpoint | None) -> dict:
    """``delta_from_sha256`` and ``delta_sha256`` of the task payload and the round's ledger entry (null
    without a published step)."""
    delta = delta_of(checkpoint)
    return {"delta_from_sha256": delta["from"] if delta else None, "delta_sha256": delta["sha256"] if delta else None}
