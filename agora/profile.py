"""What the profile page shows from every app (the project package may import every app)."""

from governance.selectors import member_activity
from marketplace.selectors import member_compute


def profile_context(user) -> dict:
    return {**member_activity(user=user), **member_compute(user=user)}
