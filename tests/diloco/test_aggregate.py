import pytest
import torch

from diloco.aggregate import aggregate, screen_updates, update_norms


def _honest(k, seed=0, scale=1.0, n=50):
    """k updates sharing a common direction plus noise, over two tensors."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(n, 3, generator=g), "b": torch.randn(n, generator=g)}
    return [{name: (v + 0.3 * torch.randn(v.shape, generator=g)) * scale for name, v in base.items()}
            for _ in range(k)], base


def test_mean_is_exact_average():
    updates, _ = _honest(4)
    out = aggregate(updates, "mean")
    for name in updates[0]:
        assert torch.allclose(out[name], torch.stack([u[name] for u in updates]).mean(0), atol=1e-6)
        assert out[name].shape == updates[0][name].shape and out[name].dtype == torch.float32


def test_large_tensor_crosses_blocks():
    g = torch.Generator().manual_seed(0)
    updates = [{"big": torch.randn(100_003, generator=g)} for _ in range(5)]
    stacked = torch.stack([u["big"] for u in updates])
    assert torch.allclose(aggregate(updates, "mean")["big"], stacked.mean(0), atol=1e-6)
    assert torch.equal(aggregate(updates, "median")["big"], stacked.median(0).values)
    trimmed = stacked.sort(0).values[1:4].mean(0)
    assert torch.allclose(aggregate(updates, "trimmed_mean", trim_fraction=0.2)["big"], trimmed, atol=1e-6)


def test_median_even_averages_middle_pair():
    updates = [{"x": torch.tensor([v])} for v in (1.0, 2.0, 10.0, 4.0)]
    assert aggregate(updates, "median")["x"].item() == pytest.approx(3.0)


def test_trimmed_mean_general_t():
    values = [1.0, 2.0, 3.0, 4.0, 100.0, -100.0, 5.0, 6.0, 7.0, 8.0]
    updates = [{"x": torch.tensor([v])} for v in values]
    # trim 0.2 of 10 = 2 from each end: drop -100, 1, 8, 100 -> mean(2..7) = 4.5
    assert aggregate(updates, "trimmed_mean", trim_fraction=0.2)["x"].item() == pytest.approx(4.5)
    assert aggregate(updates, "trimmed_mean", trim_fraction=0.0)["x"].item() == pytest.approx(3.6)


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_to_one_huge_outlier(method):
    updates, _ = _honest(7)
    honest_mean = aggregate(updates[:6], "mean")
    attacked = updates[:6] + [{k: torch.full_like(v, 1e6) for k, v in updates[0].items()}]
    robust = aggregate(attacked, method)
    plain = aggregate(attacked, "mean")
    for name in honest_mean:
        assert (robust[name] - honest_mean[name]).abs().max() < 1.0
        assert (plain[name] - honest_mean[name]).abs().max() > 1e4


def test_norm_clipped_mean_caps_influence():
    updates, _ = _honest(5)
    attacker = {k: v * 1e4 for k, v in updates[0].items()}
    out = aggregate(updates[:4] + [attacker], "norm_clipped_mean")
    honest_norms = update_norms(updates[:4])
    out_norm = update_norms([out])[0]
    assert out_norm <= max(honest_norms) + 1e-4
    # The attacker's contribution after clipping is at most median_norm / k.
    clipped = aggregate(updates[:4] + [attacker], "norm_clipped_mean", clip_norm=1.0)
    assert update_norms([clipped])[0] <= 1.0 + 1e-5
    # Nothing is clipped when every norm is under the limit: equals the mean.
    loose = aggregate(updates, "norm_clipped_mean", clip_norm=1e9)
    mean = aggregate(updates, "mean")
    assert all(torch.allclose(loose[k], mean[k], atol=1e-6) for k in mean)


def test_aggregate_rejects_bad_input():
    updates, _ = _honest(3)
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate(updates, "krum")
    with pytest.raises(ValueError, match="no updates"):
        aggregate([], "mean")
    with pytest.raises(ValueError, match="different tensor names"):
        aggregate([updates[0], {"w": updates[1]["w"]}], "mean")
    with pytest.raises(ValueError, match="shape"):
        aggregate([updates[0], {"w": torch.zeros(2), "b": updates[1]["b"]}], "mean")


def test_screen_accepts_honest_updates():
    updates, _ = _honest(4)
    screens = screen_updates(updates)
    assert all(s.accepted for s in screens), screens
    assert all(s.cosine > 0.5 and s.norm > 0 for s in screens)


def test_screen_rejects_nan_huge_and_flipped():
    honest, _ = _honest(5)
    nan = {k: v.clone() for k, v in honest[0].items()}
    nan["b"][3] = float("nan")
    huge = {k: v * 100 for k, v in honest[1].items()}
    flipped = {k: -v for k, v in honest[2].items()}
    tiny = {k: v * 1e-4 for k, v in honest[3].items()}
    updates = [*honest, nan, huge, flipped, tiny]
    screens = screen_updates(updates, max_norm_ratio=5.0)
    assert [s.accepted for s in screens] == [True] * 5 + [False] * 4
    assert "non-finite values in b" in screens[5].reason
    assert screens[5].norm == -1.0
    assert "norm" in screens[6].reason and "median" in screens[6].reason
    assert screens[7].code == "direction" and "robust centre" in screens[7].reason and screens[7].cosine < -0.5
    assert "1/" in screens[8].reason


def test_screen_two_opposing_updates_both_rejected():
    honest, _ = _honest(1)
    screens = screen_updates([honest[0], {k: -v for k, v in honest[0].items()}])
    assert [s.accepted for s in screens] == [False, False]
    assert "cannot tell" in screens[0].reason


def test_screen_single_update():
    honest, _ = _honest(1)
    (screen,) = screen_updates(honest)
    assert screen.accepted and screen.cosine == 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 11])
def test_median_and_trimmed_match_sort_reference(k):
    g = torch.Generator().manual_seed(k)
    updates = [{"x": torch.randn(70_001, generator=g), "y": torch.randn(3, 4, generator=g)} for _ in range(k)]
    for name in ("x", "y"):
        ordered = torch.stack([u[name] for u in updates]).sort(0).values
        median = ordered[(k - 1) // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
        assert torch.allclose(aggregate(updates, "median")[name], median, atol=1e-6)
        t = min(int(0.3 * k), (k - 1) // 2)
        trimmed = ordered[t : k - t].mean(0)
        assert torch.allclose(aggregate(updates, "trimmed_mean", trim_fraction=0.3)[name], trimmed, atol=1e-5)
