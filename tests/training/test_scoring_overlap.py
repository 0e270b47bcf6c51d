"""The server scores an overlapping task on the windows of the steps its own seed drew."""

from training.models import Task
from training.services.contributions import _seed_steps

OVERLAP = {"inner_steps": 50, "overlap": True}


def test_steps_trained_ahead_are_left_out_only_in_an_overlap_run_and_within_bounds():
    assert _seed_steps(Task(metrics={}), OVERLAP) == 50
    assert _seed_steps(Task(metrics={"overlap_steps": 12}), OVERLAP) == 38
    assert _seed_steps(Task(metrics={"overlap_steps": 12}), {"inner_steps": 50, "overlap": False}) == 50
    assert _seed_steps(Task(metrics={"overlap_steps": 500}), OVERLAP) == 1
    for bogus in (-3, 0, True, "12", 1.5, None):
        assert _seed_steps(Task(metrics={"overlap_steps": bogus}), OVERLAP) == 50
