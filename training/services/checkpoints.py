"""Checkpoints and community models: weights written content addressed, then a row names them."""

from __future__ import annotations

import json
import logging
import time

import torch
from django.db import transaction
from django.db.models import Max

from diloco.checkpoint import save_weights, sha256_hex
from diloco.models import build_model, init_state
from ledger.services import entry_append
from training import blobs
from training.models import Checkpoint, CommunityModel, ModelVersion, checkpoint_storage_name

log = logging.getLogger(__name__)


def _checkpoint_blob(state: dict[str, torch.Tensor], meta: dict, *, before_write=None) -> tuple[str, int]:
    """Write weights content-addressed; returns (sha256, size). Safe to repeat, safe outside transactions.
    ``before_write(sha)`` runs once the name is known and before anything is written."""
    data = save_weights(state, meta)
    sha = sha256_hex(data)
    if before_write is not None:
        before_write(sha)
    blobs.blob_write(checkpoint_storage_name(sha), data, content_addressed=True, sha256=sha)  # verified on disk
    blobs.remember_state(sha, state, meta)
    return sha, len(data)


def _checkpoint_row(*, sha: str, size: int, model: CommunityModel, **fields) -> Checkpoint:
    checkpoint, _ = Checkpoint.objects.get_or_create(sha256=sha, defaults={"model": model, "size": size, **fields})
    return checkpoint


def _model_meta(arch: str, config: dict, **extra) -> dict:
    return {"arch": arch, "config": config, **extra}


def community_model_ensure(
    *, slug: str, name: str, arch: str, config: dict, seed: int = 0, description: str = ""
) -> CommunityModel:
    """The community model ``slug``, created with fresh weights (``init_state(seed)``, its first version)
    if it does not exist.

    Idempotent: an existing model is returned unchanged (and given initial weights if it has none).
    """
    existing = CommunityModel.objects.filter(slug=slug).first()
    if existing is not None and existing.current_checkpoint_id:
        return existing
    build_model(arch, config)  # raises ValueError for an unknown arch or config
    sha, size = _checkpoint_blob(init_state(arch, config, seed), _model_meta(arch, config, seed=seed))
    with transaction.atomic():
        model, created = CommunityModel.objects.select_for_update().get_or_create(
            slug=slug, defaults={"name": name, "arch": arch, "config": config, "description": description}
        )
        if model.current_checkpoint_id:
            return model
        checkpoint = _checkpoint_row(sha=sha, size=size, model=model, note=f"initial weights (seed {seed})")
        model.current_checkpoint = checkpoint
        model.save(update_fields=["current_checkpoint"])
        number = (ModelVersion.objects.filter(model=model).aggregate(n=Max("number"))["n"] or 0) + 1
        ModelVersion.objects.create(model=model, number=number, checkpoint=checkpoint, arch=arch, config=config,
                                    source=f"initial weights (seed {seed})")
        entry_append(actor=None, action="model.created", subject=f"model:{slug}",
                     payload={"slug": slug, "arch": arch, "config": config, "checkpoint": sha, "seed": seed,
                              "version": number})
    return model


def _save_step(new_state: dict, meta: dict, outer_tensors: dict, outer_name: str, *,
               manifest_name: str = "") -> tuple[str, int, str, dict]:
    """Write a step's checkpoint (content addressed) and outer optimizer state; returns
    (checkpoint sha256, checkpoint size, outer state sha256, timings). With ``manifest_name``, the names
    about to be written are put there first (storage only, no database: this may run in a thread)."""

    def list_files(sha: str) -> None:
        if manifest_name:
            blobs.blob_write(manifest_name, json.dumps({"checkpoint": sha, "outer_state": outer_name}).encode())

    t = time.perf_counter()
    sha, size = _checkpoint_blob(new_state, meta, before_write=list_files)
    t_outer = time.perf_counter()
    outer_bytes = save_weights(outer_tensors, {"run_id": meta.get("run_id"), "round": meta.get("round")})
    outer_sha = sha256_hex(outer_bytes)
    blobs.blob_write(outer_name, outer_bytes, sha256=outer_sha)  # checked on disk before the run row names it
    blobs.remember_outer_state(outer_name, outer_tensors)
    done = time.perf_counter()
    return sha, size, outer_sha, {"save_checkpoint_s": t_outer - t, "save_outer_state_s": done - t_outer}


def _discard_step(sha: str, outer_name: str) -> None:
    """Remove the blobs of a step that was turned down. The checkpoint blob stays if some checkpoint row
    already names the same bytes (identical weights written by an earlier round)."""
    blobs.blob_delete(outer_name)
    if not Checkpoint.objects.filter(sha256=sha).exists():
        blobs.blob_delete(checkpoint_storage_name(sha))
