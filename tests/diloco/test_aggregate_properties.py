"""The blockwise aggregators equal their few-line definitions on any finite input (huge magnitudes too),
and leave out non-finite rows."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diloco.aggregate import METHODS, _sorting_network, aggregate

F32_MAX = float(torch.finfo(torch.float32).max)
EPS = float(torch.finfo(torch.float32).eps)
TINY = float(torch.finfo(torch.float32).tiny)

values = st.one_of(
    st.floats(-10.0, 10.0, width=32),
    st.floats(-1e9, 1e9, width=32),  # outliers whose float32 sum swallows the kept values
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # anything finite, up to ±3.4e38
    st.sampled_from([F32_MAX, -F32_MAX, 1e30, -1e30, 1e8, -1e8, 0.0, -0.0]),
)


@st.composite
def matrices(draw, min_k=1):
    k = draw(st.integers(min_k, 9))
    n = draw(st.integers(1, 12))
    return torch.tensor(draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=k, max_size=k)),
                        dtype=torch.float32)


def reference(rows: torch.Tensor, method: str, trim_fraction: float = 0.25, clip_norm=None) -> torch.Tensor:
    """The definitions, in float64."""
    x, k = rows.double(), rows.shape[0]
    if method == "mean":
        return x.mean(0)
    s = x.sort(0).values
    if method == "median":
        return s[(k - 1) // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    if method == "trimmed_mean":
        t = min(math.floor(trim_fraction * k), (k - 1) // 2)
        return s[t : k - t].mean(0)
    norms = x.norm(dim=1)
    clip = statistics.median(norms.tolist()) if clip_norm is None else clip_norm
    w = torch.tensor([min(1.0, clip / n) if n > 0 else 1.0 for n in norms.tolist()], dtype=torch.float64)
    return (x * w[:, None]).sum(0) / k


def _bound(rows: torch.Tensor, method: str, trim_fraction: float = 0.25) -> torch.Tensor:
    """How far float32 may be from the float64 definition: a few ulps of the values that are kept."""
    x, k = rows.double().abs(), rows.shape[0]
    if method == "trimmed_mean":
        s = rows.double().sort(0).values
        t = min(math.floor(trim_fraction * k), (k - 1) // 2)
        scale = s[t : k - t].abs().max(0).values
    elif method == "median":
        s = rows.double().sort(0).values
        scale = s[max(0, (k - 1) // 2 - 1) : k // 2 + 1].abs().max(0).values
    else:
        scale = x.max(0).values
    return (k + 2) * EPS * scale + 4 * TINY


def _agg(rows: torch.Tensor, method: str, **kw) -> torch.Tensor:
    return aggregate([{"x": r.clone()} for r in rows], method, **kw)["x"]


@settings(max_examples=150, deadline=None)
@given(rows=matrices(), method=st.sampled_from(["mean", "median", "trimmed_mean"]),
       trim=st.sampled_from([0.0, 0.2, 0.25, 0.34, 0.49]))
def test_coordinatewise_methods_equal_their_definition(rows, method, trim):
    out = _agg(rows, method, trim_fraction=trim)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    ref = reference(rows, method, trim)
    assert bool(((out.double() - ref).abs() <= _bound(rows, method, trim)).all()), (rows, out, ref)


@settings(max_examples=100, deadline=None)
@given(rows=matrices(), clip=st.one_of(st.none(), st.floats(1e-3, 1e3)))
def test_norm_clipped_mean_equals_its_definition(rows, clip):
    out = _agg(rows, "norm_clipped_mean", clip_norm=clip)
    ref = reference(rows, "norm_clipped_mean", clip_norm=clip)
    assert bool(torch.isfinite(out).all())
    scale = rows.double().abs().max(0).values
    assert bool(((out.double() - ref).abs() <= (rows.shape[0] + 4) * EPS * scale + 4 * TINY).all()), (rows, out, ref)


def test_trimmed_values_far_larger_than_the_kept_ones_do_not_cancel_them():
    """A float32 ``sum - max - min`` returns 0 here instead of 1.5."""
    rows = torch.tensor([[1e8, 1e30], [1.0, 1.0], [2.0, 2.0], [-1e8, -3e38]])
    assert _agg(rows, "trimmed_mean", trim_fraction=0.25).tolist() == [1.5, 1.5]
    assert _agg(torch.tensor([[F32_MAX], [F32_MAX]]), "median").item() == F32_MAX  # no overflow to inf
    assert _agg(torch.tensor([[F32_MAX], [F32_MAX], [F32_MAX]]), "mean").item() == pytest.approx(F32_MAX, rel=1e-6)


@settings(max_examples=80, deadline=None)
@given(rows=matrices(), method=st.sampled_from(METHODS),
       bad=st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), min_size=1, max_size=3),
       where=st.data())
def test_non_finite_rows_are_left_out(rows, method, bad, where):
    updates = [{"x": r.clone()} for r in rows]
    poisoned = list(updates)
    for value in bad:
        row = rows[0].clone()
        row[where.draw(st.integers(0, rows.shape[1] - 1))] = value
        poisoned.insert(where.draw(st.integers(0, len(poisoned))), {"x": row})
    out = aggregate(poisoned, method)["x"]
    assert torch.equal(out, aggregate(updates, method)["x"])


def test_only_non_finite_rows_is_an_error_not_a_nan_result():
    with pytest.raises(ValueError, match="no finite update"):
        aggregate([{"x": torch.tensor([float("nan"), 1.0])}, {"x": torch.tensor([float("inf"), 1.0])}], "median")


@pytest.mark.parametrize("k", range(1, 17))
def test_sorting_network_sorts_every_zero_one_input(k):
    """The 0-1 principle: a comparator network that sorts every 0/1 sequence sorts everything."""
    network = _sorting_network(k)
    for bits in range(1 << k):
        row = [(bits >> i) & 1 for i in range(k)]
        for i, j in network:
            if row[i] > row[j]:
                row[i], row[j] = row[j], row[i]
        assert row == sorted(row)


@settings(max_examples=100, deadline=None)
@given(k=st.integers(2, 9), n=st.integers(1, 40), data=st.data())
def test_leave_one_out_centre_equals_the_median_of_the_others(k, n, data):
    """Screening's centre for update i is the coordinate median of the other updates, ties included."""
    from diloco.aggregate import _loo_median_dots

    ints = st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=k, max_size=k)
    rows = torch.tensor(data.draw(ints), dtype=torch.float32) * data.draw(st.sampled_from([1.0, 0.5, 1e20]))
    dots, squares = _loo_median_dots([{"x": r.clone()} for r in rows], ["x"])
    for i in range(k):
        others = torch.cat([rows[:i], rows[i + 1:]]).double()
        centre = reference(others, "median")
        assert dots[i] == pytest.approx(float(rows[i].double() @ centre), rel=1e-5, abs=1e-6)
        assert squares[i] == pytest.approx(float(centre @ centre), rel=1e-5, abs=1e-6)
