"""Reactions to other apps' signals. Receivers only enqueue; the Celery task calls the service."""

from __future__ import annotations

from django.db import transaction


def on_training_proposal_approved(sender, proposal_id: int, **kwargs) -> None:
    from training.tasks import enqueue, start_run

    transaction.on_commit(lambda: enqueue(start_run, proposal_id))


def on_round_result_stored(sender, round_id: int, **kwargs) -> None:
    from training.tasks import enqueue, round_check

    enqueue(round_check, round_id)
