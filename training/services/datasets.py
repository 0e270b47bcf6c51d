"""A run's data, prepared once on the server: loaded, filtered, tokenized and cut into content-addressed shards.

When a run starts whose data is not simply the built-in corpus read as bytes (``tokenizer.kind`` bpe or
model, ``dataset.format`` jsonl or parquet, or a ``file:``/``https:`` source), :func:`dataset_build` runs
before the run's transaction:

1. the documents are loaded once within the server's source policy (``diloco.data.load_dataset``) and split
   into train and held-out exactly as agents split them (``split_documents``, seed 0);
2. the data-filter guardrails in force drop documents from both splits BEFORE tokenization, one guardrail
   after another, so the count each removed is known (a document two filters match counts for the first);
3. the tokenizer is trained on the filtered TRAINING split only (bpe; deterministic, so a rebuild gives the
   same sha256), or is the model's imported one (model), or is bytes;
4. the train split is cut into one shard per worker slot (``shard_assignment``: balanced by bytes) and each
   shard, and the held-out split, is tokenized and written as a token shard (``diloco.data``).

Every blob is content addressed, so a repeat (a retried start, a lost race) rewrites the same bytes. Inside
the run's transaction :func:`dataset_record` stores the rows and appends ``dataset.prepared`` to the ledger
(source, raw sha256, format, documents kept and removed per guardrail, tokenizer sha256, shard sha256s). A
dataset that cannot be prepared fails the run with the reason (``run.failed``): nothing else was handed out.

Agents download only their shard and the tokenizer; the server evaluates on the held-out shard and scores
contributions on the shards, each filtered again by the guardrails in force at that moment.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from torch import Tensor

from diloco.data import (
    DatasetError,
    ShardError,
    TokenShard,
    bits_per_byte,
    encode_token_shard,
    load_dataset,
    read_token_shard,
    shard_assignment,
    shard_filtered_tokens,
    split_documents,
)
from diloco.guardrails import GuardrailError, filter_documents
from diloco.tokenization import TokenizerError, load_tokenizer, train_bpe
from ledger.services import entry_append
from training import blobs
from training.models import DatasetBlob, PreparedDataset, TrainingRun, dataset_blob_storage_name

log = logging.getLogger(__name__)


def dataset_needs_preparing(spec: dict) -> bool:
    """Whether a run is pre-tokenized on the server: every run but a byte-level one on the built-in corpus,
    which every agent has (it ships with Python) and which keeps protocol v1's task unchanged. A file under
    the server's data root or an https download then reaches agents only as their own shard."""
    ds, tok = spec.get("dataset") or {}, spec.get("tokenizer") or {}
    return (tok.get("kind", "byte") != "byte" or ds.get("format", "text") != "text"
            or not str(ds.get("source", "")).startswith("builtin:"))


@dataclass
class BuiltDataset:
    """What :func:`dataset_build` wrote (or why it could not): the rows :func:`dataset_record` stores."""

    problem: str = ""
    source: str = ""
    format: str = "text"
    text_field: str = ""
    raw_sha256: str = ""
    tokenizer_kind: str = "byte"
    tokenizer_sha256: str = ""
    tokenizer_size: int = 0
    vocab_size: int = 256
    shards: list[dict] = field(default_factory=list)
    heldout: dict = field(default_factory=dict)
    documents: dict = field(default_factory=dict)
    guardrails: list[dict] = field(default_factory=list)


def _write_blob(kind: str, data: bytes) -> tuple[str, int]:
    from diloco.checkpoint import sha256_hex

    sha = sha256_hex(data)
    blobs.blob_write(dataset_blob_storage_name(kind, sha), data, content_addressed=True, sha256=sha)
    return sha, len(data)


def tokenizer_store(*, data: bytes) -> tuple[str, int]:
    """Check an imported ``tokenizer.json`` and store it content addressed; (sha256, vocabulary size).

    Raises ``TokenizerError`` saying what is wrong. Writes the blob and its row (idempotent)."""
    tok = load_tokenizer(data)
    sha, size = _write_blob(DatasetBlob.Kind.TOKENIZER, bytes(data))
    DatasetBlob.objects.get_or_create(sha256=sha, defaults={"kind": DatasetBlob.Kind.TOKENIZER, "size": size})
    return sha, tok.vocab_size


def _model_tokenizer_sha256(model) -> str:
    """The tokenizer imported with the model's latest version ('' when it has none)."""
    versions = getattr(model, "versions", None) if model is not None else None
    if versions is None:
        return ""
    latest = versions.order_by("-number").first()
    return (getattr(latest, "tokenizer_sha256", "") or "") if latest is not None else ""


def _filter_in_turn(docs: list[str], guardrails: list[dict]) -> tuple[list[str], list[int]]:
    removed = []
    for guardrail in guardrails:
        docs, dropped = filter_documents(docs, [guardrail])
        removed.append(dropped)
    return docs, removed


def _shard_info(data: bytes, shard_docs: list[str], index: int | None) -> dict:
    shard = read_token_shard(data)
    sha, size = _write_blob(DatasetBlob.Kind.SHARD, data)
    info = {"sha256": sha, "size": size, "tokens": int(shard.tokens.numel()), "documents": len(shard_docs),
            "bytes": shard.nbytes}
    return info if index is None else {"index": index, **info}


def dataset_build(*, spec: dict, model=None, guardrails: list[dict]) -> BuiltDataset:
    """Load, filter, tokenize and write a run's shards (outside any transaction; see the module docstring).

    Returns a ``BuiltDataset`` whose ``problem`` says why the data cannot be used (refused source, parse
    error, tokenizer, guardrail that cannot be enforced, too little text); nothing is raised for those."""
    ds, tok_spec = spec["dataset"], spec.get("tokenizer") or {"kind": "byte"}
    count = int(spec["diloco"]["workers_per_round"])
    fmt = ds.get("format", "text")
    text_field = ds.get("field") if fmt == "jsonl" else ds.get("column") if fmt == "parquet" else None
    built = BuiltDataset(source=ds["source"], format=fmt, text_field=text_field or "", tokenizer_kind=tok_spec["kind"])
    try:
        docs, built.raw_sha256 = load_dataset(ds["source"], ds.get("sha256"), str(settings.VAR_DIR / "datasets"),
                                              policy=blobs.dataset_policy(), format=fmt, field=text_field)
        train, heldout = split_documents(docs, float(ds.get("heldout_fraction", 0.1)))
        built.documents = {"loaded": len(docs), "train": len(train), "heldout": len(heldout)}
        train, removed_train = _filter_in_turn(train, guardrails)
        heldout, removed_heldout = _filter_in_turn(heldout, guardrails)
        built.documents.update(kept_train=len(train), kept_heldout=len(heldout))
        built.guardrails = [{"id": g.get("id"), "title": g.get("title", ""), "removed_train": rt,
                             "removed_heldout": rh} for g, rt, rh in zip(guardrails, removed_train, removed_heldout,
                                                                          strict=True)]
        if len(train) < count:
            raise DatasetError(f"dataset {ds['source']} has {len(train)} training documents after the data "
                               f"filters, fewer than the {count} shards it must be cut into")
        if not heldout:
            raise DatasetError(f"dataset {ds['source']} has no held-out document left to evaluate on")
        if tok_spec["kind"] == "bpe":
            tokenizer_json = train_bpe(train, int(tok_spec["vocab_size"]))
        elif tok_spec["kind"] == "model":
            sha = _model_tokenizer_sha256(model)
            if not sha:
                raise TokenizerError(f"model {spec['model']['name']} has no imported tokenizer; "
                                     "use tokenizer.kind bpe or byte")
            tokenizer_json = blobs.blob_read(dataset_blob_storage_name(DatasetBlob.Kind.TOKENIZER, sha), sha256=sha)
        else:
            tokenizer_json = None
        tokenizer = load_tokenizer(tokenizer_json)
        model_vocab = spec["model"]["config"].get("vocab_size", 256)
        if isinstance(model_vocab, int) and tokenizer.vocab_size > model_vocab:
            raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's config has "
                                 f"vocab_size {model_vocab}; raise model.config.vocab_size")
        if tokenizer_json is not None:
            built.tokenizer_sha256, built.tokenizer_size = _write_blob(DatasetBlob.Kind.TOKENIZER, tokenizer_json)
        built.vocab_size = tokenizer.vocab_size
        owner = shard_assignment(train, count)
        for index in range(count):
            mine = [d for d, s in zip(train, owner, strict=True) if s == index]
            data = encode_token_shard(mine, tokenizer, meta={"split": "train", "shard_index": index,
                                                             "shard_count": count})
            built.shards.append(_shard_info(data, mine, index))
        built.heldout = _shard_info(encode_token_shard(heldout, tokenizer, meta={"split": "heldout"}), heldout, None)
    except (DatasetError, TokenizerError, GuardrailError, ShardError) as exc:
        built.problem = f"the dataset cannot be prepared: {exc}"
    except OSError as exc:
        built.problem = f"the dataset cannot be prepared: storage failed ({exc.__class__.__name__}: {exc})"
    return built


def dataset_record(*, run: TrainingRun, built: BuiltDataset, now=None) -> PreparedDataset | None:
    """Store what ``dataset_build`` wrote for ``run`` and append ``dataset.prepared``; with a problem, fail the
    run instead (``run.failed`` with the reason) and return None. Runs inside the caller's transaction."""
    now = now or timezone.now()
    with transaction.atomic():
        if built.problem:
            run.status, run.reason, run.finished_at = TrainingRun.Status.FAILED, built.problem[:2000], now
            run.save(update_fields=["status", "reason", "finished_at"])
            entry_append(actor=None, action="run.failed", subject=run.ledger_subject,
                         payload={"run_id": run.pk, "reason": run.reason})
            return None
        if built.tokenizer_sha256:
            DatasetBlob.objects.get_or_create(sha256=built.tokenizer_sha256, defaults={
                "kind": DatasetBlob.Kind.TOKENIZER, "size": built.tokenizer_size})
        for info in [*built.shards, built.heldout]:
            DatasetBlob.objects.get_or_create(sha256=info["sha256"], defaults={
                "kind": DatasetBlob.Kind.SHARD, "size": info["size"]})
        prepared = PreparedDataset.objects.create(
            run=run, source=built.source, format=built.format, field=built.text_field, raw_sha256=built.raw_sha256,
            tokenizer_kind=built.tokenizer_kind, tokenizer_id=built.tokenizer_sha256 or None,
            vocab_size=built.vocab_size, shards=built.shards, heldout=built.heldout, documents=built.documents,
            guardrails=built.guardrails, created_at=now)
        entry_append(actor=None, action="dataset.prepared", subject=run.ledger_subject, payload={
            "run_id": run.pk, "source": built.source, "format": built.format, "field": built.text_field or None,
            "raw_sha256": built.raw_sha256, "documents": built.documents, "guardrails": built.guardrails,
            "tokenizer": {"kind": built.tokenizer_kind, "sha256": built.tokenizer_sha256 or None,
                          "vocab_size": built.vocab_size},
            "shards": [s["sha256"] for s in built.shards], "heldout": built.heldout["sha256"]})
    return prepared


# --- reading prepared data (server side) ------------------------------------------------------------


def run_dataset(run: TrainingRun) -> PreparedDataset | None:
    """The run's prepared dataset, or None for a run on protocol v1's byte-level text path."""
    try:
        return run.prepared_dataset
    except PreparedDataset.DoesNotExist:
        return None


@functools.lru_cache(maxsize=8)
def _tokenizer(sha256: str):
    data = blobs.blob_read(dataset_blob_storage_name(DatasetBlob.Kind.TOKENIZER, sha256), sha256=sha256) \
        if sha256 else None
    return load_tokenizer(data)


@functools.lru_cache(maxsize=32)
def _shard(sha256: str) -> TokenShard:
    return read_token_shard(blobs.blob_read(dataset_blob_storage_name(DatasetBlob.Kind.SHARD, sha256), sha256=sha256))


def prepared_tokenizer(prepared: PreparedDataset):
    return _tokenizer(prepared.tokenizer_sha256)


def prepared_shard(sha256: str) -> TokenShard:
    """A stored token shard, checked against its sha256 and parsed (cached by sha256)."""
    return _shard(sha256)


def run_heldout_tokens(run: TrainingRun) -> Tensor:
    """The held-out tokens the server evaluates a run on: its held-out shard, or protocol v1's bytes."""
    prepared = run_dataset(run)
    if prepared is None:
        return blobs.heldout_tokens(run.spec["dataset"])
    return prepared_shard(prepared.heldout["sha256"]).tokens


def run_shard_tokens(run: TrainingRun, prepared: PreparedDataset, index: int, guardrails: list[dict]) -> Tensor:
    """Shard ``index`` of a prepared run without what the data filters in force drop: what its agent trains on."""
    return shard_filtered_tokens(prepared_shard(prepared.shard_sha256(index)), prepared_tokenizer(prepared),
                                 guardrails)[0]


def run_bits_per_byte(run: TrainingRun, loss: float | None) -> float | None:
    """A held-out loss in bits per byte of text (byte-level runs: nats per byte over ln 2)."""
    if loss is None or not math.isfinite(loss):
        return None
    prepared = run_dataset(run)
    if prepared is None:
        bpb = loss / math.log(2)
    else:
        bpb = bits_per_byte(loss, tokens=int(prepared.heldout["tokens"]), nbytes=int(prepared.heldout["bytes"]))
    # A diverged loss near the float limit overflows the conversion: no figure rather than infinity.
    return bpb if bpb is not None and math.isfinite(bpb) else None


def clear_caches() -> None:
    _tokenizer.cache_clear()
    _shard.cache_clear()


def dataset_build_if_needed(*, spec: dict, model=None) -> BuiltDataset | None:
    """``dataset_build`` with the data filters in force, for a spec that is pre-tokenized (else None)."""
    if not dataset_needs_preparing(spec):
        return None
    from governance.selectors import guardrails_active

    return dataset_build(spec=spec, model=model, guardrails=guardrails_active(kind="data_filter"))


def task_dataset_payload(payload: dict, *, run: TrainingRun, shard_index: int, request) -> dict:
    """Add the prepared-data keys to a prepared run's task JSON (additive; a byte-level text run's task is
    unchanged): ``dataset.format``, ``dataset.shard_sha256`` / ``shard_url`` / ``shard_size``, and ``tokenizer``
    (``kind`` byte|bpe, ``sha256``, ``vocab_size``, ``url``)."""
    from django.urls import reverse

    prepared = run_dataset(run)
    if prepared is None:  # protocol v1 as it was: the agent reads the source and trains on its bytes
        return payload
    shard = prepared.shards[shard_index]
    payload["dataset"].update(format=prepared.format, shard_sha256=shard["sha256"], shard_size=shard["size"],
                              shard_url=request.build_absolute_uri(reverse("api-shard", args=[shard["sha256"]])))
    sha = prepared.tokenizer_sha256
    payload["tokenizer"] = {
        "kind": "bpe" if sha else "byte", "sha256": sha or None, "vocab_size": prepared.vocab_size,
        "url": request.build_absolute_uri(reverse("api-tokenizer", args=[sha])) if sha else None}
    return payload


def dataset_blob_get(*, sha256: str, kind: str) -> DatasetBlob | None:
    """A stored tokenizer or shard by sha256 (None for another kind or a malformed hash)."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        return None
    return DatasetBlob.objects.filter(sha256=sha256, kind=kind).first()
