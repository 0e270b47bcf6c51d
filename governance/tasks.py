from celery import shared_task

from governance import services


@shared_task(name="governance.close_due_proposals", soft_time_limit=50, time_limit=60)
def close_due_proposals() -> list[int]:
    """Beat task: close every proposal whose window has passed. Safe to run twice (closing is idempotent)."""
    return services.proposals_close_due()


@shared_task(name="governance.close_proposal", soft_time_limit=20, time_limit=30, acks_late=True)
def close_proposal(proposal_id: int) -> str:
    return services.proposal_close(proposal_id=proposal_id).status
