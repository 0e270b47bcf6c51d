"""What the profile page shows from every app. The project package may import every app."""


def profile_context(user) -> dict:
    context: dict = {}
    try:
        from governance.selectors import member_activity
    except ImportError:
        pass
    else:
        context.update(member_activity(user=user))
    try:
        from marketplace.selectors import member_compute
    except ImportError:
        pass
    else:
        context.update(member_compute(user=user))
    return context
