"""The home page gathers a little from each area (the project package may import every app): for a visitor,
what the community is doing; for a member, what needs them."""

from governance.selectors import home_summary as governance_summary
from governance.selectors import member_needs
from marketplace.selectors import home_summary as marketplace_summary
from marketplace.selectors import member_compute
from training.models import TrainingRun
from training.selectors import home_summary as training_summary


def home_context(user=None) -> dict:
    context = {**governance_summary(), **marketplace_summary(), **training_summary()}
    if user is not None and user.is_authenticated:
        needs = member_needs(user=user)
        runs = (
            TrainingRun.objects.filter(proposal_id__in=needs.pop("voted_yes_ids"))
            .select_related("proposal", "model")
            .order_by("-created_at", "-id")[:10]
        )
        context.update(needs, my_runs=list(runs), my_workers=member_compute(user=user)["workers"])
    return context
