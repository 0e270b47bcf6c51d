"""The outer optimizer of DiLoCo: SGD with (Nesterov) momentum over the averaged pseudo-gradient.

The update is written out directly rather than wrapping ``torch.optim.SGD`` so that the state is just
named tensors. It performs exactly the operations of ``torch.optim.SGD(nesterov=True, dampening=0)``
(and yields bitwise the same parameters): the momentum buffer is set to the first gradient on the first
step, as torch's is (the same as starting it at zero).

    buf ← momentum · buf + g
    θ   ← θ − lr · (g + momentum · buf)     (Nesterov)   or   θ − lr · buf   (classical)

With lr 1 and momentum 0 this is FedAvg (θ ← θ − mean Δ).

SparseLoCo (sparse codecs, ``diloco.sparse``): the workers' error feedback stands in for the outer momentum,
so the server takes a plain SGD step on the mean of the sparse updates (momentum 0, lr ``SPARSE_OUTER_LR``)
and the step stays as sparse as the union of the updates. Momentum may still be set (a dense step).

Published steps (``publish="fp16"``): the optimizer computes the step ``d = lr · (direction)`` once,
rounds it to float16 precision (:func:`published_delta`) and subtracts it, θ ← θ − d, one IEEE subtraction
per element; ``last_delta`` holds ``d`` for ``diloco.sparse.encode_published_delta``, so an agent holding
θ rebuilds the new weights bitwise from ``d`` alone. Rounding the step to float16 changes it by at most
2⁻¹¹ of its size (values under 6·10⁻⁵ by at most 3·10⁻⁸), far below the codecs' own error; a tensor whose
step exceeds the float16 range keeps float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

_STEP_KEY = "__step__"
_PREFIX = "momentum."
PUBLISH = (None, "fp16", "fp32")
SPARSE_OUTER_LR = 1.0  # SparseLoCo's outer step: the mean of the sparse updates, unscaled
_FP16_MAX = 65504.0


def published_delta(step: dict[str, Tensor], *, values: str = "fp16") -> dict[str, Tensor]:
    """The exact float32 step to publish and subtract: ``step`` rounded to float16 precision (a tensor
    beyond the float16 range stays float32) with every zero a +0.0, so θ − d on any CPU matches the sparse
    form of d, which carries no zeros."""
    if values not in ("fp16", "fp32"):
        raise ValueError(f"published values must be fp16 or fp32, not {values!r}")
    out = {}
    for name, t in step.items():
        t = t.detach().to("cpu", torch.float32)
        if values == "fp16" and (t.numel() == 0 or t.abs().max().item() <= _FP16_MAX):
            t = t.to(torch.float16).to(torch.float32)
        out[name] = t.add(0.0)  # -0.0 + 0.0 = +0.0
    return out


class OuterOptimizer:
    def __init__(self, params: dict[str, Tensor], lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True,
                 publish: str | None = None):
        if publish not in PUBLISH:
            raise ValueError(f"outer publish must be one of {PUBLISH}, not {publish!r}")
        if not lr > 0:
            raise ValueError("outer lr must be > 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError("outer momentum must be in [0, 1)")
        if nesterov and momentum == 0:
            nesterov = False
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.params = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in params.items()}
        self.buffers: dict[str, Tensor] = {}
        self.steps = 0
        self.publish = publish
        self.last_delta: dict[str, Tensor] | None = None  # the published step d of the last step()

    def step(self, pseudo_gradient: dict[str, Tensor]) -> dict[str, Tensor]:
        """Apply one outer step and return (copies of) the new parameters."""
        missing = sorted(set(self.params) - set(pseudo_gradient))
        extra = sorted(set(pseudo_gradient) - set(self.params))
        if missing or extra:
            raise ValueError(f"pseudo-gradient names differ from the parameters: missing {missing[:3]}, extra {extra[:3]}")
        for name, theta in self.params.items():
            g = pseudo_gradient[name].to("cpu", torch.float32)
            if g.shape != theta.shape:
                raise ValueError(f"pseudo-gradient {name} has shape {tuple(g.shape)}, expected {tuple(theta.shape)}")
        delta = {}
        for name, theta in self.params.items():
            g = pseudo_gradient[name].to("cpu", torch.float32)
            if self.momentum:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            if self.publish:
                d = published_delta({name: g.mul(self.lr)}, values=self.publish)[name]
                theta.sub_(d)
                delta[name] = d
            else:
                theta.add_(g, alpha=-self.lr)
        self.last_delta = delta if self.publish else None
        self.steps += 1
        return {k: v.clone() for k, v in self.params.items()}

    def state_tensors(self, *, copy: bool = True) -> dict[str, Tensor]:
        """Momentum buffers as ``{"momentum.<name>": tensor}`` plus ``"__step__"``: safetensors-ready.

        ``copy=False`` returns the live buffers (no 4-bytes-per-parameter copy) for a caller that will
        not step this optimizer again while it uses them."""
        out = {f"{_PREFIX}{k}": (v.clone() if copy else v) for k, v in self.buffers.items()}
        out[_STEP_KEY] = torch.tensor([self.steps], dtype=torch.int64)
        return out

    @classmethod
    def from_state(
        cls,
        params: dict[str, Tensor],
        state_tensors: dict[str, Tensor],
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        publish: str | None = None,
    ) -> OuterOptimizer:
        """Rebuild an optimizer that continues exactly where the exported one stopped."""
        opt = cls(params, lr=lr, momentum=momentum, nesterov=nesterov, publish=publish)
        for key, value in state_tensors.items():
            if key == _STEP_KEY:
                opt.steps = int(value.reshape(-1)[0])
                continue
            if not key.startswith(_PREFIX) or key[len(_PREFIX):] not in opt.params:
                raise ValueError(f"outer optimizer state has an unknown entry {key!r}")
            name = key[len(_PREFIX):]
            if value.shape != opt.params[name].shape:
                raise ValueError(f"outer momentum {name} has shape {tuple(value.shape)}, expected {tuple(opt.params[name].shape)}")
            opt.buffers[name] = value.detach().to("cpu", torch.float32, copy=True).contiguous()
        if opt.buffers and set(opt.buffers) != set(opt.params):
            raise ValueError("outer optimizer state lacks momentum for some parameters")
        return opt
