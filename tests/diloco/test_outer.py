import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.outer import OuterOptimizer


def _params():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}


def test_nesterov_matches_hand_computed_update():
    p0 = _params()
    g1, g2 = _grads(1), _grads(2)
    opt = OuterOptimizer(p0, lr=0.7, momentum=0.9)
    p1 = opt.step(g1)
    p2 = opt.step(g2)
    for k in p0:
        buf1 = g1[k]
        expect1 = p0[k] - 0.7 * (g1[k] + 0.9 * buf1)
        buf2 = 0.9 * buf1 + g2[k]
        expect2 = expect1 - 0.7 * (g2[k] + 0.9 * buf2)
        assert torch.allclose(p1[k], expect1, atol=1e-6)
        assert torch.allclose(p2[k], expect2, atol=1e-6)


def test_bitwise_equal_to_torch_sgd_nesterov():
    p0 = _params()
    opt = OuterOptimizer(p0, lr=0.7, momentum=0.9)
    tparams = {k: torch.nn.Parameter(v.clone()) for k, v in p0.items()}
    sgd = torch.optim.SGD(tparams.values(), lr=0.7, momentum=0.9, nesterov=True)
    for seed in range(1, 5):
        g = _grads(seed)
        ours = opt.step(g)
        for k, p in tparams.items():
            p.grad = g[k].clone()
        sgd.step()
        assert all(torch.equal(ours[k], tparams[k].detach()) for k in ours)


def test_fedavg_is_plain_subtraction():
    p0 = _params()
    g = _grads(1)
    p1 = OuterOptimizer(p0, lr=1.0, momentum=0.0).step(g)
    assert all(torch.equal(p1[k], p0[k] - g[k]) for k in p0)


def test_classical_momentum():
    p0 = _params()
    g1, g2 = _grads(1), _grads(2)
    opt = OuterOptimizer(p0, lr=0.5, momentum=0.9, nesterov=False)
    opt.step(g1)
    p2 = opt.step(g2)
    for k in p0:
        expect = p0[k] - 0.5 * g1[k] - 0.5 * (0.9 * g1[k] + g2[k])
        assert torch.allclose(p2[k], expect, atol=1e-6)


def test_restart_continues_bitwise_exactly():
    p0 = _params()
    g1, g2, g3 = _grads(1), _grads(2), _grads(3)
    straight = OuterOptimizer(p0)
    straight.step(g1)
    straight.step(g2)
    expected = straight.step(g3)

    first = OuterOptimizer(p0)
    params = first.step(g1)
    blob = st_save(first.state_tensors())  # what the server stores between rounds
    resumed = OuterOptimizer.from_state(params, st_load(blob), lr=0.7, momentum=0.9, nesterov=True)
    assert resumed.steps == 1
    resumed.step(g2)
    got = resumed.step(g3)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_step_does_not_alias_inputs():
    p0 = _params()
    keep = {k: v.clone() for k, v in p0.items()}
    opt = OuterOptimizer(p0)
    out = opt.step(_grads(1))
    out["a"].zero_()
    assert all(torch.equal(p0[k], keep[k]) for k in p0)
    assert not torch.equal(opt.params["a"], torch.zeros(5, 3))


def test_rejects_bad_inputs():
    opt = OuterOptimizer(_params())
    with pytest.raises(ValueError, match="names differ"):
        opt.step({"a": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"a": torch.zeros(3, 5), "b": torch.zeros(7)})
    with pytest.raises(ValueError, match="unknown entry"):
        OuterOptimizer.from_state(_params(), {"momentum.zzz": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        OuterOptimizer.from_state(_params(), {"momentum.a": torch.zeros(2), "momentum.b": torch.zeros(7)})
    with pytest.raises(ValueError, match="lacks momentum"):
        OuterOptimizer.from_state(_params(), {"momentum.a": torch.zeros(5, 3)})


def test_published_step_is_the_rounded_step_subtracted():
    from diloco.outer import published_delta

    p0 = _params()
    g1, g2 = _grads(1), _grads(2)
    opt = OuterOptimizer(p0, lr=0.7, momentum=0.9, publish="fp16")
    p1 = opt.step(g1)
    d1 = opt.last_delta
    for k in p0:
        assert torch.equal(d1[k], published_delta({k: 0.7 * (g1[k] + 0.9 * g1[k])})[k])
        assert torch.equal(p1[k], p0[k] - d1[k])
        assert torch.equal(d1[k].half().float(), d1[k])
    # it stays within float16 precision of the unrounded optimizer
    plain = OuterOptimizer(p0, lr=0.7, momentum=0.9)
    plain.step(g1)
    q2 = plain.step(g2)
    d2 = opt.step(g2) and opt.last_delta
    p2 = opt.params
    for k in p0:  # each step rounded by at most 2⁻¹¹ of itself (plus the float32 rounding of θ)
        bound = 2**-11 * (d1[k].abs() + d2[k].abs()) * 1.01 + 4 * torch.finfo(torch.float32).eps * p2[k].abs()
        assert ((p2[k] - q2[k]).abs() <= bound + 1e-7).all()
    resumed = OuterOptimizer.from_state(p1, opt.state_tensors(), lr=0.7, momentum=0.9, publish="fp16")
    assert resumed.publish == "fp16" and OuterOptimizer(p0).last_delta is None


def test_sparse_outer_step_keeps_the_update_sparse():
    from diloco.outer import SPARSE_OUTER_LR

    p0 = _params()
    g = {k: torch.where(v.abs() > 1.5, v, torch.zeros_like(v)) for k, v in _grads(3).items()}
    opt = OuterOptimizer(p0, lr=SPARSE_OUTER_LR, momentum=0.0, publish="fp16")
    p1 = opt.step(g)
    for k in p0:
        assert torch.equal(opt.last_delta[k] != 0, g[k] != 0)
        assert torch.equal(p1[k] != p0[k], g[k] != 0)


def test_unknown_publish_is_refused():
    with pytest.raises(ValueError, match="publish"):
        OuterOptimizer(_params(), publish="int4")


def _big_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    # 4096 + 4096 + 1808 elements: two full published chunks and a short one, of different sizes
    return {"w": torch.randn(10000, generator=g), "b": torch.randn(7, generator=g)}


def _sparse_grads(seed, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in _big_params().items():
        x = torch.randn(v.shape, generator=g) * scale
        out[k] = torch.where(torch.rand(v.shape, generator=g) < 0.05, x, torch.zeros_like(x))
    out["w"][:4096] *= 1e-3  # a chunk a thousand times smaller keeps its own scale
    return out


def test_int8_published_step_is_int8_times_a_power_of_two_per_chunk():
    p0 = _big_params()
    opt = OuterOptimizer(p0, lr=2.0, momentum=0.0, publish="int8")
    g = _sparse_grads(1)
    p1 = opt.step(g)
    for k in p0:
        d = opt.last_delta[k]
        assert torch.equal(p1[k], p0[k] - d)  # one subtraction: what an agent computes from d
        assert torch.equal(d.half().float(), d)  # so the step still travels as float16 values
        assert not torch.signbit(d[d == 0]).any()
        assert torch.equal(d != 0, (g[k] != 0) & (d != 0))  # nothing where no update went
        flat, want = d.reshape(-1), (2.0 * g[k]).reshape(-1)
        for start in range(0, flat.numel(), 4096):
            block, target = flat[start : start + 4096], want[start : start + 4096]
            quantum = 2.0 ** math.ceil(math.log2(target.abs().max().item() / 127))
            q = block / quantum
            assert torch.equal(q, q.round()) and q.abs().max() <= 127
            assert (block - target).abs().max() <= quantum / 2  # rounded to the nearest level
            assert q.abs().max() >= 64  # the smallest power of two: the largest value uses 7 bits


def test_int8_rounding_residual_is_carried_not_lost():
    p0 = _big_params()
    opt = OuterOptimizer(p0, lr=2.0, momentum=0.0, publish="int8")
    exact = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in p0.items()}
    sent = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in p0.items()}
    for seed in range(1, 9):
        g = _sparse_grads(seed)
        opt.step(g)
        for k in p0:
            exact[k] += 2.0 * g[k].double()
            sent[k] += opt.last_delta[k].double()
    state = opt.state_tensors()
    for k in p0:
        # everything asked for was either published or is still waiting in the residual
        assert torch.allclose(sent[k] + state[f"residual.{k}"].double(), exact[k], atol=1e-9, rtol=0)
        assert state[f"residual.{k}"].abs().max() > 0  # rounding did leave something out


def test_int8_state_resumes_bitwise_and_is_checked():
    p0 = _big_params()
    straight = OuterOptimizer(p0, lr=2.0, momentum=0.0, publish="int8")
    straight.step(_sparse_grads(1))
    exported = straight.state_tensors()
    resumed = OuterOptimizer.from_state(straight.params, exported, lr=2.0, momentum=0.0, publish="int8")
    a, b = straight.step(_sparse_grads(2)), resumed.step(_sparse_grads(2))
    assert all(torch.equal(a[k], b[k]) and torch.equal(straight.last_delta[k], resumed.last_delta[k]) for k in a)
    # A resumed optimizer without the residual would publish something else.
    forgetful = OuterOptimizer.from_state(straight.params, {"__step__": exported["__step__"]}, lr=2.0,
                                          momentum=0.0, publish="int8")
    forgetful.step(_sparse_grads(3))
    straight.step(_sparse_grads(3))
    assert not torch.equal(forgetful.last_delta["w"], straight.last_delta["w"])
    with pytest.raises(ValueError, match="residual w has shape"):
        OuterOptimizer.from_state(p0, {**exported, "residual.w": torch.zeros(3)}, publish="int8")
    with pytest.raises(ValueError, match="non-finite"):
        OuterOptimizer.from_state(p0, {**exported, "residual.w": torch.full((10000,), float("nan"))},
                                  publish="int8")
    with pytest.raises(ValueError, match="residual of some"):
        OuterOptimizer.from_state(p0, {"residual.w": exported["residual.w"]}, publish="int8")
    # a run that stopped rounding to int8 has no residual to carry
    assert OuterOptimizer.from_state(p0, exported, publish="fp16").residuals == {}
