"""The norm reference from earlier rounds: pooled over several rounds so one odd round cannot set the bar,
and bounding a minority only, so a stale reference never stalls a run."""

import torch

from diloco.round import Update, reference_norms, screen


def _updates(norms, seed=0):
    """Updates sharing a direction (so the direction check passes) with the given norms."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(4096, generator=gen)
    out = []
    for i, n in enumerate(norms):
        v = shared + 0.5 * torch.randn(4096, generator=gen)
        out.append(Update(f"u{i}", {"w": v * (n / float(v.norm()))}))
    return out


def test_one_round_that_accepted_a_tiny_update_does_not_set_the_bar():
    honest_rounds = [[1.0, 1.1, 0.9, 1.05], [0.95, 1.0, 1.2]]
    pooled = reference_norms([*honest_rounds, [0.001]])
    assert sorted(pooled) == sorted([*honest_rounds[0], *honest_rounds[1], 0.001])
    verdicts = screen(_updates([1.0, 1.1, 0.9, 1.05, 0.95, 1.0]), previous_norms=pooled)
    assert all(v.accepted for v in verdicts), [v.reason for v in verdicts]
    # A single norm to go by (a run whose only accepted round accepted one update): no reference.
    assert reference_norms([[0.001]]) == []
    assert reference_norms([[1.0], [1.1], [0.9]]) == [1.0, 1.1, 0.9]
    # Only the latest rounds count.
    assert reference_norms([[9.0, 9.0, 9.0], *[[1.0]] * 5]) == [1.0] * 5
    assert reference_norms([[1.0, float("nan"), 0.0, None, 2.0, 3.0]]) == [1.0, 2.0, 3.0]


def test_a_reference_that_would_refuse_the_whole_round_is_not_followed():
    # The old rule: the previous round's median alone, applied to everyone. A round whose honest updates
    # all sit far from it was refused, and so was every round after it: the run stalled.
    verdicts = screen(_updates([1.0, 1.1, 0.9, 1.05, 0.95, 1.0]), previous_norms=[0.001, 0.001, 0.001])
    assert all(v.accepted for v in verdicts), [v.reason for v in verdicts]
    # Half of a small round outside it, an attacker's: the reference still bounds it.
    verdicts = screen(_updates([1.0, 1000.0], seed=1), previous_norms=[1.0, 1.1, 0.9])
    assert [v.code for v in verdicts] == ["accepted", "norm_high"]
    assert "previous rounds' median accepted norm" in verdicts[1].reason
    # Two attackers in six: a minority, bounded by the reference.
    verdicts = screen(_updates([1.0, 1.1, 0.9, 1.05, 4.5, 4.5], seed=2), previous_norms=[0.5, 0.5, 0.5])
    assert [v.code for v in verdicts] == ["accepted"] * 4 + ["norm_high"] * 2
