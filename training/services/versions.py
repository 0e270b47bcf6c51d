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
from django.core.exceptions import ObjectDoesNotExist
from django.db import transaction
from django.db.models import Max

from ledger.services import entry_append
from training import blobs
from training.models import Checkpoint, CommunityModel, ModelVersion, Round, TrainingRun

log = logging.getLogger(__name__)

_merged = blobs.LRU(2)
_modules = blobs.LRU(2)


def _next_number(model: CommunityModel) -> int:
    return (ModelVersion.objects.filter(model=model).aggregate(n=Max("number"))["n"] or 0) + 1


def _run_tokenizer(run: TrainingRun) -> tuple[str, int | None]:
    """The run's tokenizer sha256 ('' for bytes) and vocabulary size, from its prepared dataset if any."""
    try:
        prepared = run.prepared_dataset
    except (ObjectDoesNotExist, AttributeError):
        return "", None
    return prepared.tokenizer_sha256 or "", prepared.vocab_size


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
    tokenizer_sha256, vocab_size = _run_tokenizer(run)
    config = dict(mspec["config"])
    if vocab_size and mspec["arch"] != "byte-gpt" and not config.get("vocab_size"):
        # The run's models embed the config's vocabulary, which holds every id of the tokenizer (a trained
        # BPE may have fewer ids than asked for): the weights, not the tokenizer, fix the embedding's size.
        config["vocab_size"] = vocab_size
    version = ModelVersion.objects.create(
        model=model, number=_next_number(model), checkpoint=checkpoint, arch=mspec["arch"], config=config,
        vocab_size=config.get("vocab_size") if mspec["arch"] != "byte-gpt" else None,
        tokenizer_sha256=tokenizer_sha256, parent=parent, lora=lora,
        lora_base=run.base_version if lora else None, run=run, round=rnd, eval_loss=eval_loss, created_at=now,
    )
    fields = []
    if not lora:
        model.current_checkpoint, model.arch, model.config = checkpoint, mspec["arch"], config
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
        spec = LoraSpec.from_dict(version.lora, arch=version.arch)
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
    from training.models import DatasetBlob, dataset_blob_storage_name

    name = dataset_blob_storage_name(DatasetBlob.Kind.TOKENIZER, version.tokenizer_sha256)
    return blobs.blob_read(name, sha256=version.tokenizer_sha256)


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


MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024


@transaction.atomic
def _import_commit(*, slug: str, name: str, arch: str, config: dict, sha: str, size: int, tokenizer_sha256: str,
                   vocab_size: int | None, params: int, source: str, by) -> ModelVersion:
    model, created = CommunityModel.objects.select_for_update().get_or_create(
        slug=slug, defaults={"name": name, "arch": arch, "config": config,
                             "description": f"Imported from {source}."})
    if not created:
        model = CommunityModel.objects.select_for_update().get(pk=model.pk)
    from training.services.checkpoints import _checkpoint_row

    checkpoint = _checkpoint_row(sha=sha, size=size, model=model, note=f"imported from {source}"[:200])
    version = ModelVersion.objects.create(
        model=model, number=_next_number(model), checkpoint=checkpoint, arch=arch, config=config,
        vocab_size=vocab_size, tokenizer_sha256=tokenizer_sha256, parent=version_latest(model),
        source=f"imported from {source}"[:200])
    model.current_checkpoint, model.arch, model.config = checkpoint, arch, config
    model.save(update_fields=["current_checkpoint", "arch", "config"])
    if created:
        entry_append(actor=by, action="model.created", subject=f"model:{slug}",
                     payload={"slug": slug, "arch": arch, "config": config, "imported": True})
    entry_append(actor=by, action="model.imported", subject=f"model:{slug}", payload={
        "model": slug, "version": version.number, "arch": arch, "config": config, "checkpoint": sha,
        "tokenizer_sha256": tokenizer_sha256 or None, "parameters": params, "source": source})
    return version


def model_import(*, directory, slug: str, name: str = "", by=None) -> ModelVersion:
    """Import a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) as the next
    version of model ``slug`` (its version 1 when the model is new), with a ``model.imported`` entry.

    Raises ``ModelImportError`` naming the problem (unsupported model_type, a config out of bounds, tensors
    that do not fit the config, a malformed tokenizer, a vocabulary the weights cannot embed); nothing is
    stored then. The weights and tokenizer are written content addressed before the transaction.
    """
    from pathlib import Path

    from django.conf import settings

    from diloco.models import build_model, load_hf_directory, param_count
    from diloco.tokenization import TokenizerError
    from governance.specs import SLUG_RE
    from training.errors import ModelImportError
    from training.services.checkpoints import _checkpoint_blob, _model_meta

    slug = (slug or "").strip().lower()
    if not SLUG_RE.match(slug):
        raise ModelImportError("slug", "Use letters, digits and dashes only (no leading or trailing dash), "
                                       "at most 64 characters.")
    path = Path(directory)
    try:
        arch, config, state = load_hf_directory(path)
    except (ValueError, OSError) as exc:
        raise ModelImportError("directory", str(exc)) from None
    params = param_count(arch, config)
    if params > settings.AGORA_MAX_MODEL_PARAMS:
        raise ModelImportError("directory", f"The model has {params:,} parameters; this server takes at most "
                                            f"{settings.AGORA_MAX_MODEL_PARAMS:,} (AGORA_MAX_MODEL_PARAMS).")
    net = build_model(arch, config, seed=None)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelImportError("directory", f"The weights do not fit the config: {exc}") from None
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelImportError("directory", f"{path} has no tokenizer.json.")
    if tokenizer_file.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
        raise ModelImportError("directory", "tokenizer.json is too large.")
    from training.services.datasets import tokenizer_store

    try:
        from diloco.tokenization import load_tokenizer

        vocab = load_tokenizer(tokenizer_file.read_bytes()).vocab_size
    except TokenizerError as exc:
        raise ModelImportError("directory", f"tokenizer.json: {exc}") from None
    if vocab > config["vocab_size"]:
        raise ModelImportError("directory", f"tokenizer.json has {vocab} ids but the model embeds only "
                                            f"{config['vocab_size']}.")
    tokenizer_sha256, _ = tokenizer_store(data=tokenizer_file.read_bytes())
    sha, size = _checkpoint_blob({k: v.detach().contiguous() for k, v in state.items()},
                                 _model_meta(arch, config, imported=path.name))
    return _import_commit(slug=slug, name=name.strip() or slug, arch=arch, config=config, sha=sha, size=size,
                          tokenizer_sha256=tokenizer_sha256, vocab_size=config["vocab_size"], params=params,
                          source=path.name, by=by)


# --- LoRA runs ----------------------------------------------------------------------------------------
# A LoRA run's checkpoints, updates and outer steps cover only the adapter weights; the frozen base is the
# full weights of the version it started from (``lora_base_sha256`` in its tasks).

_adapter_references = blobs.LRU(4)


def run_lora(run: TrainingRun):
    """The run's ``diloco.lora.LoraSpec``, or None for full fine-tuning."""
    lora = run.spec["model"].get("lora")
    if not lora:
        return None
    from diloco.lora import LoraSpec

    return LoraSpec.from_dict(lora, arch=run.spec["model"]["arch"])


def run_lora_base_sha256(run: TrainingRun) -> str | None:
    """The checkpoint of full weights a LoRA run's adapters sit on (None for full fine-tuning)."""
    if run_lora(run) is None or run.base_version_id is None:
        return None
    version = run.base_version
    return version.checkpoint_id if not version.lora else version_base_checkpoint(version).sha256


def run_reference(run: TrainingRun) -> dict:
    """``{name: (shape, dtype)}`` every update of the run must match: the model's, or a LoRA run's adapters'."""
    m = run.spec["model"]
    spec = run_lora(run)
    if spec is None:
        return blobs.model_reference(m["arch"], m["config"])

    def adapters():
        from diloco.codecs import reference_of
        from diloco.lora import init_adapter_state

        return reference_of(init_adapter_state(m["arch"], m["config"], spec, 0))

    return _adapter_references.get_or_load(("adapters", m["arch"], repr(sorted(m["config"].items())), spec), adapters)


def run_model_with_weights(run: TrainingRun, state: dict) -> torch.nn.Module:
    """The run's model with ``state`` (a LoRA run's state is its adapters, over the frozen base)."""
    from diloco.models import model_with_weights

    m = run.spec["model"]
    spec = run_lora(run)
    if spec is None:
        return model_with_weights(m["arch"], m["config"], state)
    from diloco.lora import lora_model

    base = blobs.checkpoint_state(run_lora_base_sha256(run))[0]
    return lora_model(m["arch"], m["config"], base, spec, adapter_state=state)
