"""Helpers for training tests: tiny specs, approved proposals, runs, and updates like an agent makes."""

from __future__ import annotations

import json

import torch

from diloco.codecs import encode_update
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.guardrails import filter_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model
from governance.models import Proposal
from tests.governance.factories import ProposalFactory, training_spec
from training import blobs

TINY_CONFIG = {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32}


def tiny_spec(*, model: dict | None = None, diloco: dict | None = None, hardware: dict | None = None) -> dict:
    return training_spec(
        model={"name": "tiny-gpt", "arch": "byte-gpt", "config": dict(TINY_CONFIG), "init": "scratch", **(model or {})},
        dataset={"source": "builtin:python-docs", "heldout_fraction": 0.1},
        diloco={"rounds": 2, "workers_per_round": 2, "min_workers": 1, "inner_steps": 3, "inner_lr": 0.003,
                "batch_size": 4, "seq_len": 32, "warmup": 0, "compression": "int8", "aggregator": "mean",
                "round_timeout_s": 60, "replica_fraction": 0.0, **(diloco or {})},
        hardware={"min_vram_mb": 0, "allow_cpu": True, **(hardware or {})},
    )


def approved_proposal(**spec_sections) -> Proposal:
    return ProposalFactory(kind=Proposal.Kind.TRAINING, status=Proposal.Status.APPROVED, spec=tiny_spec(**spec_sections))


def task_json(task) -> dict:
    """The task as the worker API sends it to an agent."""
    from rest_framework.test import APIRequestFactory

    from training.serializers import task_payload

    return task_payload(task, request=APIRequestFactory().get("/"), guardrails=[], max_upload_bytes=0)


def cpu_worker():
    """A registered worker with no GPU (spot checks pair only same-device workers)."""
    from tests.marketplace.factories import WorkerFactory

    return WorkerFactory(gpus=[], cuda_version="")


def train_update(task_json: dict, *, codec: str | None = None) -> tuple[bytes, dict]:
    """Do what the agent does for a task (from its JSON) and return (update bytes, metrics)."""
    state, meta = blobs.checkpoint_state(task_json["checkpoint_sha256"])
    model = build_model(task_json["model"]["arch"], task_json["model"]["config"])
    model.load_state_dict(state)
    ds = task_json["dataset"]
    docs = split_documents(load_documents(ds["source"], ds["sha256"]), ds["heldout_fraction"])[0]
    docs = filter_documents(docs, task_json["guardrails"])[0]
    tokens = encode_documents(shard_documents(docs, ds["shard_index"], ds["shard_count"]))
    result = inner_train(model, tokens, InnerConfig(**task_json["inner"]), seed=task_json["seed"])
    data = encode_update(result.pseudo_gradient, codec or task_json["compression"])
    metrics = {"loss_start": result.loss_start, "loss_end": result.loss_end, "steps": result.steps,
               "tokens": result.tokens, "seconds": result.seconds}
    return data, metrics


def random_update(reference_state: dict, *, scale: float, seed: int = 0, codec: str = "int8") -> bytes:
    gen = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(v.shape, generator=gen) * scale for k, v in reference_state.items()}
    return encode_update(delta, codec)


METRICS = {"loss_start": 5.5, "loss_end": 5.0, "steps": 3, "tokens": 384, "seconds": 0.5}


def metrics_json(**overrides) -> str:
    return json.dumps({**METRICS, **overrides})
