from governance.notifications import unread_count


def notifications(request) -> dict:
    """The bell's unread count on every page (one indexed count query for a signed-in member)."""
    user = getattr(request, "user", None)
    return {"unread_notifications": unread_count(user=user) if user is not None else 0}
