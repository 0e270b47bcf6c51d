"""The outer optimizer of DiLoCo: SGD with (Nesterov) momentum over the averaged pseudo-gradient.

The update is written out directly rather than wrapping ``torch.optim.SGD`` so that the state is just
named tensors. It performs exactly the operations of ``torch.optim.SGD(nesterov=True, dampening=0)``
(and yields bitwise the same parameters): the momentum buffer is set to the first gradient on the first
step, as torch's is (the same as starting it at zero).

    buf ← momentum · buf + g
    θ   ← θ − lr · (g + momentum · buf)     (Nesterov)   or   θ − lr · buf   (classical)

With lr 1 and momentum 0 this is FedAvg (θ ← θ − mean Δ).
"""

from __future__ import annotations

import torch
from torch import Tensor

_STEP_KEY = "__step__"
_PREFIX = "momentum."


class OuterOptimizer:
    def __init__(self, params: dict[str, Tensor], lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True):
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
            if self.momentum:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            theta.add_(g, alpha=-self.lr)
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
    ) -> OuterOptimizer:
        """Rebuild an optimizer that continues exactly where the exported one stopped."""
        opt = cls(params, lr=lr, momentum=momentum, nesterov=nesterov)
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
