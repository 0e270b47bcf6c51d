"""What the profile page shows from every app (the project package may import every app)."""

from governance.selectors import delegations_of, member_activity
from marketplace.selectors import member_compute


def profile_context(user) -> dict:
    delegations = delegations_of(user=user)
    return {**member_activity(user=user), **member_compute(user=user),
            "delegations_mine": delegations["mine"], "delegations_to_me": delegations["to_me"]}
