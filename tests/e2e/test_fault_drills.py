"""Fault drills (issue 9): a run survives dying processes, a slow CPU and skewed clocks.

Each test starts a real gunicorn, Celery worker, Celery beat and ``agora-worker`` agents (and a Redis of
its own on a spare port when Redis is in use; never the machine's), trains a tiny model for three rounds,
injects one fault in round 2, and then checks what a user relies on: the run finishes (or fails with a
stated reason), round 2 commits within ``AGORA_DRILL_RECOVERY_LIMIT_S`` (120 s) of the fault, every round
is aggregated exactly once, credits are granted at most once per task, every committed checkpoint matches
its sha256, no dead attempt's outer-state blob is left, and the ledger verifies. The scenarios and the
checks live in ``tests/e2e/drillkit.py``; ``python -m bench.drills`` runs the same scenarios and prints
their recovery times.

    pytest -m drill            # just these
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.drillkit import DRILLS, describe, missing_need, run_drill

pytestmark = [pytest.mark.e2e, pytest.mark.drill, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("drill", DRILLS, ids=[d.name for d in DRILLS])
def test_fault_drill(drill, tmp_path):
    why_not = missing_need(drill)
    if why_not:
        if os.environ.get("AGORA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{drill.name} cannot run: {why_not}")
        pytest.skip(why_not)

    outcome = run_drill(drill, tmp_path)

    print(describe(outcome))
    for note in outcome.notes:
        print("note:", note)
    assert not outcome.problems, "\n".join([describe(outcome), *outcome.problems])
    assert outcome.run_status == "finished" or outcome.run_reason, describe(outcome)
    assert outcome.recovery_s is not None, describe(outcome)
