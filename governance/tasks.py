from celery import shared_task

from governance import services


@shared_task(name="governance.close_due_proposals", soft_time_limit=50, time_limit=60)
def close_due_proposals() -> list[int]:
    """Beat task: close every proposal whose window has passed. Safe to run twice (closing is idempotent)."""
    return services.proposals_close_due()

