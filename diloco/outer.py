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

``publish="int8"`` (the sparse runs' mode, ``training.services.deltas.publish_mode``): each tensor is cut
into chunks of ``PUBLISH_CHUNK`` elements, as the published step's encoder cuts it, and each chunk of the
step is rounded to ``q · 2^e``: q an integer in −127..127 and 2^e the smallest power of two with
``absmax / 2^e ≤ 127`` (2^e at least 2⁻²⁴, so every value is also exactly a float16). What the rounding
leaves out is not lost: it is kept in a residual (``residual.<name>`` in :meth:`OuterOptimizer.state_tensors`)
and added to the next step before it is rounded, the server's own error feedback. A published value then
needs 8 bits instead of 16, and the step stays about as sparse as the updates: a coordinate no update
touched gets a value only once its residual reaches half its chunk's quantum.
"""

from __future__ import annotations

import torch
from torch import Tensor

_STEP_KEY = "__step__"
_PREFIX = "momentum."
_RESIDUAL = "residual."
PUBLISH = (None, "fp16", "fp32", "int8")
PUBLISH_CHUNK = 4096  # the published step's chunk (``diloco.sparse.encode_published_delta``'s default)
_MIN_EXP = -24  # 2^-24 is float16's smallest step: q · 2^e is then exactly a float16 up to its range
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


def pow2_exponents(absmax: Tensor) -> Tensor:
    """Per chunk, the smallest integer e with ``absmax / 2^e <= 127``, exactly (``frexp``, no logarithm
    rounding), at least ``_MIN_EXP``; chunks that are all zero get ``_MIN_EXP``."""
    mantissa, exponent = torch.frexp(absmax / 127.0)  # absmax/127 = m · 2^k, m in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two needs no extra bit
    return e.clamp_(min=_MIN_EXP)


def round_int8_pow2(x: Tensor, *, chunk: int = PUBLISH_CHUNK) -> Tensor:
    """``x`` rounded per chunk of ``chunk`` elements (flattened, the last chunk may be shorter) to
    ``q · 2^e`` with q an integer in −127..127: float32 values every CPU reproduces exactly (no zero is
    negative)."""
    flat = x.detach().to("cpu", torch.float32).reshape(-1)
    out = torch.empty_like(flat)
    full, rest = divmod(flat.numel(), chunk)
    for start, rows, length in ((0, full, chunk), (full * chunk, 1 if rest else 0, rest)):
        if not rows:
            continue
        block = flat[start : start + rows * length].view(rows, length)
        scale = torch.ldexp(torch.ones(rows), pow2_exponents(block.abs().amax(dim=1)))[:, None]
        out[start : start + rows * length] = (block / scale).round_().clamp_(-127, 127).mul_(scale).reshape(-1)
    return out.add_(0.0).view(x.shape)  # -0.0 + 0.0 = +0.0


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
        self.residuals: dict[str, Tensor] = {}  # publish="int8": what the rounding left out, added next step
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
            if self.publish == "int8":
                want = g.mul(self.lr)
                if name in self.residuals:
                    want.add_(self.residuals[name])
                d = round_int8_pow2(want)
                self.residuals[name] = want.sub_(d)
                theta.sub_(d)
                delta[name] = d
            elif self.publish:
                d = published_delta({name: g.mul(self.lr)}, values=self.publish)[name]
                theta.sub_(d)
                delta[name] = d
            else:
                theta.add_(g, alpha=-self.lr)
        self.last_delta = delta if self.publish else None
        self.steps += 1
        return {k: v.clone() for k, v in self.params.items()}

    def state_tensors(self, *, copy: bool = True) -> dict[str, Tensor]:
        """Momentum buffers as ``{"momentum.<name>": tensor}``, the int8 rounding residuals as
        ``{"residual.<name>": tensor}``, plus ``"__step__"``: safetensors-ready.

        ``copy=False`` returns the live buffers (no 4-bytes-per-parameter copy) for a caller that will
        not step this optimizer again while it uses them."""
        out = {f"{_PREFIX}{k}": (v.clone() if copy else v) for k, v in self.buffers.items()}
        out.update({f"{_RESIDUAL}{k}": (v.clone() if copy else v) for k, v in self.residuals.items()})
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
            prefix = next((p for p in (_PREFIX, _RESIDUAL) if key.startswith(p)), None)
            if prefix is None or key[len(prefix):] not in opt.params:
                raise ValueError(f"outer optimizer state has an unknown entry {key!r}")
            name = key[len(prefix):]
            what = "outer momentum" if prefix == _PREFIX else "outer rounding residual"
            if value.shape != opt.params[name].shape:
                raise ValueError(f"{what} {name} has shape {tuple(value.shape)}, expected {tuple(opt.params[name].shape)}")
            value = value.detach().to("cpu", torch.float32, copy=True).contiguous()
            if not torch.isfinite(value).all():
                raise ValueError(f"{what} {name} has non-finite values")
            (opt.buffers if prefix == _PREFIX else opt.residuals)[name] = value
        if opt.buffers and set(opt.buffers) != set(opt.params):
            raise ValueError("outer optimizer state lacks momentum for some parameters")
        if opt.residuals and set(opt.residuals) != set(opt.params):
            raise ValueError("outer optimizer state lacks the rounding residual of some parameters")
        if opt.publish != "int8":
            opt.residuals = {}  # a run whose steps are no longer rounded to int8 has nothing left to carry
        return opt
