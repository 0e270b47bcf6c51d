"""Training runs: started from approved proposals, canceled by staff, finished with their last round."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone
from rest_framework import serializers

from core.notifications import notify_users
from diloco.models import init_state
from governance.models import Proposal, Vote
from governance.services import proposal_enact
from ledger.services import entry_append
from training.errors import (
    RunError,
    RunForbidden,
    TrainingError,
)
from training.models import Checkpoint, CommunityModel, ModelVersion, Round, Task, TrainingRun
from training.services.checkpoints import _checkpoint_blob, _checkpoint_row, _model_meta
from training.services.datasets import dataset_build_if_needed, dataset_record
from training.services.rounds import _round_close_tasks, _round_open, _tell_stopped
from training.services.versions import version_base_checkpoint

log = logging.getLogger(__name__)


def run_start(*, proposal_id: int) -> TrainingRun | None:
    """Turn an approved training proposal into a run and open its first round; enact the proposal.

    Idempotent: returns the existing run for an already picked-up proposal, None for one that is not
    (or no longer) approved. The initial weights are written before the transaction (content-addressed,
    so a repeat or a lost race only rewrites the same bytes).
    """
    proposal = Proposal.objects.filter(pk=proposal_id, kind=Proposal.Kind.TRAINING).first()
    if proposal is None:
        return None
    existing = TrainingRun.objects.filter(proposal_id=proposal_id).first()
    if existing is not None or proposal.status != Proposal.Status.APPROVED:
        return existing
    spec = proposal.spec
    mspec = spec["model"]
    arch, config = mspec["arch"], mspec["config"]
    model = CommunityModel.objects.filter(slug=mspec["name"]).first()
    base_version, problem = _run_base_version(model, mspec)
    base_sha, base_size = None, 0
    if base_version is not None and mspec.get("lora") and not problem:
        # A LoRA run trains adapters over the version's frozen weights: its checkpoints are the adapters,
        # starting from fresh ones (B = 0, so the run's first state is the version itself).
        from diloco.lora import LoraSpec, init_adapter_state

        version_base_checkpoint(base_version)  # the frozen base, written once when the version is a LoRA's
        lora = LoraSpec.from_dict(mspec["lora"], arch=arch)
        base_sha, base_size = _checkpoint_blob(init_adapter_state(arch, config, lora, proposal.pk),
                                               _model_meta(arch, config, seed=proposal.pk, lora=lora.to_dict()))
    elif base_version is not None:
        base_sha = version_base_checkpoint(base_version).sha256
    else:
        base_sha, base_size = _checkpoint_blob(init_state(arch, config, proposal.pk),
                                               _model_meta(arch, config, seed=proposal.pk))
    built = dataset_build_if_needed(spec=spec, model=model)  # content-addressed blobs, before the transaction
    now = timezone.now()
    with transaction.atomic():
        proposal = Proposal.objects.select_for_update().get(pk=proposal_id)
        existing = TrainingRun.objects.filter(proposal_id=proposal_id).first()
        if existing is not None or proposal.status != Proposal.Status.APPROVED:
            return existing
        model, created = CommunityModel.objects.get_or_create(
            slug=mspec["name"],
            defaults={"name": mspec["name"], "arch": arch, "config": config,
                      "description": f"Created by proposal #{proposal.pk}: {proposal.title}"},
        )
        if created:
            entry_append(actor=None, action="model.created", subject=f"model:{model.slug}",
                         payload={"slug": model.slug, "arch": arch, "config": config, "proposal_id": proposal.pk})
        base = Checkpoint.objects.filter(sha256=base_sha).first() or _checkpoint_row(
            sha=base_sha, size=base_size, model=model, note=f"initial weights for proposal #{proposal.pk}")
        hardware = spec.get("hardware") or {}
        branches = list(TrainingRun.objects.filter(
            model=model, status__in=[TrainingRun.Status.PENDING, TrainingRun.Status.RUNNING]
        ).values_list("pk", flat=True))
        run = TrainingRun.objects.create(
            proposal=proposal, model=model, spec=spec, status=TrainingRun.Status.PENDING,
            total_rounds=int(spec["diloco"]["rounds"]), base_checkpoint=base, base_version=base_version,
            min_vram_mb=int(hardware.get("min_vram_mb") or 0), allow_cpu=bool(hardware.get("allow_cpu")),
            created_at=now,
        )
        entry_append(actor=None, action="run.created", subject=run.ledger_subject,
                     payload={"run_id": run.pk, "proposal_id": proposal.pk, "content_hash": proposal.content_hash,
                              "model": model.slug, "base_checkpoint": base.sha256,
                              "init": f"v{base_version.number}" if base_version else "scratch",
                              "base_version": base_version.number if base_version else None,
                              "lora": bool(mspec.get("lora")), "alongside_runs": branches,
                              "rounds": run.total_rounds})
        proposal_enact(proposal=proposal, outcome={"run_id": run.pk})
        if problem:
            run.status, run.reason, run.finished_at = TrainingRun.Status.FAILED, problem, now
            run.save(update_fields=["status", "reason", "finished_at"])
            entry_append(actor=None, action="run.failed", subject=run.ledger_subject,
                         payload={"run_id": run.pk, "reason": problem})
            return run
        if built is not None and dataset_record(run=run, built=built, now=now) is None:
            return run  # the run failed: its data cannot be prepared (the reason is in the ledger)
        _round_open(run=run, index=1, checkpoint_in=base, now=now)
    return run


def _run_base_version(model: CommunityModel | None, mspec: dict) -> tuple[ModelVersion | None, str]:
    """The version a run starts from and, when it cannot start, why.

    ``latest`` (or its old name ``current``) takes the model's latest version if its architecture and
    config are the spec's, else fresh weights, as before versions existed; a version number must exist and
    match; LoRA needs a version to adapt.
    """
    init = mspec.get("init", "latest")
    if init == "scratch":
        return None, ""
    versions = ModelVersion.objects.select_related("model", "checkpoint")
    if model is None:
        version = None
    elif isinstance(init, int):
        version = versions.filter(model=model, number=init).first()
    else:
        version = versions.filter(model=model).order_by("-number").first()
    matches = version is not None and version.arch == mspec["arch"] and version.config == mspec["config"]
    if isinstance(init, int):
        if version is None:
            return None, f"model {mspec['name']} has no version {init}"
        if not matches:
            return version, (f"version {init} of {mspec['name']} is a {version.arch} model with another config "
                             f"than the spec's")
        return version, ""
    if mspec.get("lora") and not matches:
        return None, f"LoRA needs a version of {mspec['name']} with the spec's architecture and config; there is none"
    return (version if matches else None), ""


def runs_start_approved() -> list[int]:
    """Pick up every approved training proposal (the beat's belt to the approval signal's braces)."""
    from governance.selectors import training_proposals_to_enact

    started = []
    for proposal_id in list(training_proposals_to_enact().values_list("pk", flat=True)):
        try:
            run = run_start(proposal_id=proposal_id)
        except Exception:  # one bad proposal must not stop the others
            log.exception("could not start a run for proposal %s", proposal_id)
            continue
        if run is not None:
            started.append(run.pk)
    return started


MAX_CANCEL_REASON = 2_000


@transaction.atomic
def run_cancel(*, run_id: int, by, reason: str) -> TrainingRun:
    """pending/running -> canceled (terminal), staff only, with a public reason.

    The open round is closed (``canceled``, with a ``round.canceled`` entry) and its open tasks expire at
    once, so agents stop getting work from the run, heartbeats tell them to stop, and their uploads are
    refused (410); an aggregation already under way commits nothing (see ``_aggregate_commit``). Rows are
    locked round first, then run: the order ``_aggregate_commit`` uses.
    """
    if by is None or not getattr(by, "is_authenticated", False) or not by.is_staff:
        raise RunForbidden("only staff can cancel a training run")
    reason = (reason or "").strip()
    if not reason:
        raise serializers.ValidationError({"reason": ["Canceling a run needs a reason; it is published in the ledger."]})
    if len(reason) > MAX_CANCEL_REASON:
        raise serializers.ValidationError({"reason": [f"At most {MAX_CANCEL_REASON} characters."]})
    open_rounds = list(Round.objects.select_for_update().filter(
        run_id=run_id, status__in=[Round.Status.OPEN, Round.Status.AGGREGATING]).order_by("index"))
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None:
        raise TrainingError(f"there is no run {run_id}", code="not_found", http_status=404)
    if not run.is_active:
        raise RunError(f"only a pending or running run can be canceled, not a {run.status} one")
    run.status, run.reason, run.finished_at = TrainingRun.Status.CANCELED, reason, timezone.now()
    run.save(update_fields=["status", "reason", "finished_at"])
    entry_append(actor=by, action="run.canceled", subject=run.ledger_subject, payload={"reason": reason})
    for rnd in open_rounds:
        was = rnd.status
        rnd.status, rnd.reason = Round.Status.CANCELED, f"run canceled: {reason}"
        rnd.aggregation_token, rnd.lease_expires_at = "", None
        rnd.save(update_fields=["status", "reason", "aggregation_token", "lease_expires_at"])
        closed = _round_close_tasks(rnd, reason="run canceled")
        entry_append(actor=by, action="round.canceled", subject=run.ledger_subject,
                     payload={"run_id": run.pk, "round": rnd.index, "was": was, "expired_tasks": closed})
    _run_expire_stray_tasks(run)
    return run


def _run_expire_stray_tasks(run: TrainingRun) -> None:
    """Open tasks left in rounds that are not open (none should be): expire them too."""
    stray = Task.objects.filter(round__run=run, status__in=[Task.Status.PENDING, Task.Status.ASSIGNED])
    rows = list(stray.values_list("pk", "worker_id"))
    if rows:
        Task.objects.filter(pk__in=[pk for pk, _ in rows]).update(status=Task.Status.EXPIRED, reason="run canceled")
        _tell_stopped({pk: (w, "run canceled") for pk, w in rows if w is not None})


def _run_finish(*, run: TrainingRun, final: Checkpoint, now) -> None:
    run.status, run.final_checkpoint, run.finished_at = TrainingRun.Status.FINISHED, final, now
    run.save(update_fields=["status", "final_checkpoint", "finished_at"])
    model = CommunityModel.objects.select_for_update().get(pk=run.model_id)
    m = run.spec["model"]
    if not m.get("lora"):  # a LoRA run's checkpoints are adapters; its versions carry the merge
        model.current_checkpoint = final
        model.arch, model.config = m["arch"], m["config"]
        model.save(update_fields=["current_checkpoint", "arch", "config"])
    rounds = list(run.rounds.order_by("index").values("index", "accepted", "eval_loss_before", "eval_loss_after"))
    entry_append(actor=None, action="run.finished", subject=run.ledger_subject,
                 payload={"run_id": run.pk, "model": model.slug, "final_checkpoint": final.sha256,
                          "rounds": len(rounds), "accepted_rounds": sum(1 for r in rounds if r["accepted"])})
    notify_users(
        user_ids=[*Proposal.objects.filter(pk=run.proposal_id).values_list("author", flat=True),
                  *Vote.objects.filter(proposal_id=run.proposal_id).values_list("voter", flat=True)],
        kind="run_finished", text=f"Training run #{run.pk} finished: {model.name} has a new version",
        url=f"/runs/{run.pk}/",
    )
