import random
import statistics

import pytest

from workers.client import Backoff


def test_delays_stay_within_the_exponential_ceiling():
    backoff = Backoff(base=0.5, cap=1000.0, rng=random.Random(1))
    for attempt in range(10):
        ceiling = min(1000.0, 0.5 * 2**attempt)
        assert backoff.ceiling() == ceiling
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling


def test_delays_are_capped_forever():
    backoff = Backoff(base=1.0, cap=30.0, rng=random.Random(2))
    delays = [backoff.next_delay() for _ in range(200)]
    assert max(delays) <= 30.0
    assert backoff.ceiling() == 30.0  # no overflow after many attempts
    late = delays[10:]
    assert max(late) > 20.0  # the cap is reached, not some smaller bound


def test_full_jitter_spreads_delays_over_the_whole_range():
    samples = []
    for seed in range(400):
        backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(seed))
        for _ in range(4):
            backoff.next_delay()
        samples.append(backoff.next_delay())  # 5th attempt: uniform in [0, 16]
    assert min(samples) < 2.0 and max(samples) > 14.0
    assert 6.0 < statistics.mean(samples) < 10.0
    assert len(set(samples)) == len(samples)


def test_reset_starts_again_from_the_base():
    backoff = Backoff(base=2.0, cap=100.0, rng=random.Random(3))
    for _ in range(5):
        backoff.next_delay()
    assert backoff.ceiling() == 64.0
    backoff.reset()
    assert backoff.ceiling() == 2.0
    assert backoff.next_delay() <= 2.0


@pytest.mark.parametrize("base,cap", [(0, 10), (-1, 10), (5, 1)])
def test_rejects_nonsense_bounds(base, cap):
    with pytest.raises(ValueError):
        Backoff(base=base, cap=cap)
