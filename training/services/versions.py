"""Model versions: every accepted round (and every imported directory) publishes the next version of a model.

Runs of one model branch rather than queue: a run starts from the model's latest version when it starts,
and each of its accepted rounds becomes a new version whose parent is the run's previous version. Two
runs of one model therefore both keep all of their results (versions are immutable and numbered per
model); the model's "latest" is the most recently accepted round of any of them, and each version names
its lineage. Queueing would let one long run hold every other proposal for the model for days.

LoRA runs keep only adapter weights in their round checkpoints. The full weights of such a version are
merged lazily, when the playground or an export first needs them, and cached (``version_state``); a run
that starts from a LoRA version writes the merged weights once as its content-addressed base checkpoint.
"""

from __future__ import annotations

import logging
import math

import torch
from django.db import transaction
from django.db.models import Max

from ledger.services import entry_append
from training import blobs
from training.models import Checkpoint, CommunityModel, ModelVersion, Round, TrainingRun

log = logging.getLogger(__name__)

TOKENIZER_PREFIX = "tokenizers"
_merged = blobs.LRU(2)
_modules = blobs.LRU(2)


def tokenizer_storage_name(sha256: str) -> str:
    return f"{TOKENIZER_PREFIX}/{sha256[:2]}/{sha256}.json"


def _next_number(model: CommunityModel) -> int:
    return (ModelVersion.objects.filter(model=model).aggregate(n=Max("number"))["n"] or 0) + 1


def _run_tokenizer_sha256(run: TrainingRun) -> str:
    return getattr(run, "tokenizer_sha256", "") or ""


def _version_publish(*, run: TrainingRun, rnd: Round, checkpoint: Checkpoint, eval_loss: float | None,
                     now) -> ModelVersion:
    """The next version of the run's model, from an accepted round. Runs inside the round's commit
    transaction (the caller holds the round and run locks); the model row is locked to number it."""
    model = CommunityModel.objects.select_for_update().get(pk=run.model_id)
    if eval_loss is not None and not math.isfinite(eval_loss):
        eval_loss = None
    mspec = run.spec["model"]
    parent = (ModelVersion.objects.filter(run=run).order_by("-number").first() or run.base_version)
    lora = mspec.get("lora")
    version = ModelVersion.objects.create(
        model=model, number=_next_number(model), checkpoint=checkpoint, arch=mspec["arch"], config=mspec["config"],
        vocab_size=mspec["config"].get("vocab_size") if mspec["arch"] != "byte-gpt" else None,
        tokenizer_sha256=_run_tokenizer_sha256(run), parent=parent, lora=lora,
        lora_base=run.base_version if lora else None, run=run, round=rnd, eval_loss=eval_loss, created_at=now,
    )
    fields = []
    if not lora:
        model.current_checkpoint, model.arch, model.config = checkpoint, mspec["arch"], mspec["config"]
        fields = ["current_checkpoint", "arch", "config"]
    if fields:
        model.save(update_fields=fields)
    entry_append(actor=None, action="model.version_published", subject=f"model:{model.slug}", payload={
        "model": model.slug, "version": version.number, "run_id": run.pk, "round": rnd.index,
        "checkpoint": checkpoint.sha256, "parent": parent.number if parent else None,
        "lora": bool(lora), "tokenizer_sha256": version.tokenizer_sha256 or None, "eval_loss": eval_loss,
    })
    return version


def version_latest(model: CommunityModel) -> ModelVersion | None:
    return ModelVersion.objects.filter(model=model).order_by("-number").first()


def version_state(version: ModelVersion) -> dict[str, torch.Tensor]:
    """The version's full weights (LoRA adapters merged into their base, once, then cached).
    Callers must not modify the tensors."""
    if not version.lora:
        return blobs.checkpoint_state(version.checkpoint_id)[0]

    def merge():
        from diloco.lora import LoraSpec, merge_lora

        base = ModelVersion.objects.get(pk=version.lora_base_id)
        adapters = blobs.checkpoint_state(version.checkpoint_id)[0]
        spec = LoraSpec(**version.lora)
        return merge_lora(version.arch, version.config, version_state(base), adapters, spec)

    return _merged.get_or_load(("merged", version.pk), merge)


def version_module(version: ModelVersion) -> torch.nn.Module:
    """An eval-mode model with the version's full weights (for the playground), cached."""

    def load():
        from diloco.models import build_model

        net = _build(version.arch, version.config, version.vocab_size, build_model)
        net.load_state_dict(version_state(version))
        net.eval()
        return net

    return _modules.get_or_load(("module", version.pk, version.checkpoint_id), load)


def _build(arch, config, vocab_size, build_model):
    if vocab_size and arch != "byte-gpt":
        try:
            return build_model(arch, config, vocab_size=vocab_size)
        except TypeError:  # a zoo without the vocab_size keyword
            pass
    return build_model(arch, config)


def version_tokenizer_json(version: ModelVersion) -> bytes | None:
    """The version's tokenizer.json bytes, or None for a byte-level model."""
    if not version.tokenizer_sha256:
        return None
    return blobs.blob_read(tokenizer_storage_name(version.tokenizer_sha256), sha256=version.tokenizer_sha256)


def version_base_checkpoint(version: ModelVersion) -> Checkpoint:
    """A checkpoint of the version's full weights to start a run from (a LoRA version's merge is written
    once, content addressed)."""
    if not version.lora:
        return version.checkpoint
    from training.services.checkpoints import _checkpoint_blob, _checkpoint_row, _model_meta

    sha, size = _checkpoint_blob(dict(version_state(version)), _model_meta(version.arch, version.config,
                                                                            merged_from=version.number))
    with transaction.atomic():
        return _checkpoint_row(sha=sha, size=size, model=version.model,
                               note=f"v{version.number} with its LoRA adapters merged")
