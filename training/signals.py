"""Signals training's services send, so they never import the Celery tasks that react to them."""

from django.dispatch import Signal

# Sent after a task's result is committed (kwargs: ``round_id``); ``training.receivers`` enqueues the
# round check.
round_result_stored = Signal()
