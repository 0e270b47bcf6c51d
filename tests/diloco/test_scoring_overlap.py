"""An overlapping agent trains a task's first steps ahead on the previous task's batches: its own windows are
drawn only from the batches the rest of its steps took from the task's seed."""

import torch

from diloco.contributions import add_trained_windows
from diloco.data import sample_batch

STEPS, BATCH, SEQ = 10, 4, 16


def _seeded_windows(tokens, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x, y = sample_batch(tokens, BATCH, SEQ, gen)
        out.extend(torch.cat([x, y[:, -1:]], dim=1))
    return {tuple(w.tolist()) for w in out}


def test_an_overlapping_tasks_windows_come_only_from_the_steps_its_seed_drew():
    tokens = {0: torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1))}
    windows: dict = {}
    keys = add_trained_windows(windows, {"plain": (0, 7), "ahead": (0, 7, 3)}, tokens, steps=STEPS,
                               batch_size=BATCH, seq_len=SEQ, count=12, seed=99)
    plain, ahead = windows[keys["plain"]], windows[keys["ahead"]]
    first_three = _seeded_windows(tokens[0], 7, 3)
    assert {tuple(w.tolist()) for w in ahead} <= first_three  # only what the remaining 3 steps trained on
    assert len(ahead) == 12
    # Without the claim, the picks spread over all 10 steps' batches, most outside the first three.
    assert not {tuple(w.tolist()) for w in plain} <= first_three
    assert {tuple(w.tolist()) for w in plain} <= _seeded_windows(tokens[0], 7, STEPS)


def test_a_claim_is_bounded_to_the_tasks_steps():
    tokens = {0: torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(2))}
    windows: dict = {}
    keys = add_trained_windows(windows, {"zero": (0, 5, 0), "huge": (0, 5, 10**9)}, tokens, steps=STEPS,
                               batch_size=BATCH, seq_len=SEQ, count=8, seed=3)
    assert keys["zero"][-1] == 1 and keys["huge"][-1] == STEPS
