"""The home page gathers a little from each area."""


def home_context() -> dict:
    context: dict = {}
    for module, name in (
        ("governance.selectors", "home_summary"),
        ("marketplace.selectors", "home_summary"),
        ("training.selectors", "home_summary"),
    ):
        try:
            summary = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
        context.update(summary())
    return context
