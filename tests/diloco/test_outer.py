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
        OuterOptimizer(_params(), publish="int8")
