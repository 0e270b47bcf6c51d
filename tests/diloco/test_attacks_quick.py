"""The attack drill of ``bench.attacks`` in small: through the server's round code (screen, replay and score
checks, aggregate, outer step, gate), free-riders earn nothing and no honest update is turned away."""

import pytest

from bench.attacks import Setup, _data, simulate

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}


@pytest.fixture(scope="module")
def setup_and_data():
    setup = Setup(rounds=3, inner_steps=5, workers=8, malicious=2, batch_size=8, seq_len=32, model=dict(TINY),
                  score_windows=16)
    return setup, _data(setup), {}


def _outcome(attack, setup_and_data):
    setup, data, seen = setup_and_data
    if attack not in seen:
        seen[attack] = simulate(attack, setup, data)
    return seen[attack]


@pytest.mark.parametrize("attack", ["public-step", "replay", "median-noise", "collude", "nan"])
def test_attackers_earn_nothing_and_honest_workers_are_not_rejected(attack, setup_and_data):
    setup = setup_and_data[0]
    out = _outcome(attack, setup_and_data)
    assert out.attacker_total > 0
    assert out.attacker_credited == 0, out.reasons
    assert out.honest_rejected == 0, out.reasons
    assert out.honest_total == (setup.workers - setup.malicious) * setup.rounds


def test_the_public_step_and_replays_are_caught_as_replays(setup_and_data):
    public = _outcome("public-step", setup_and_data)
    assert public.reasons.get("attacker: replay", 0) >= 2  # rounds 2 and 3 (round 1 has no public step yet)
