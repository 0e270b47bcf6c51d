"""The home page gathers a little from each area (the project package may import every app)."""

from governance.selectors import home_summary as governance_summary
from marketplace.selectors import home_summary as marketplace_summary
from training.selectors import home_summary as training_summary


def home_context() -> dict:
    return {**governance_summary(), **marketplace_summary(), **training_summary()}
