"""The inner loop of DiLoCo: H steps of AdamW on a worker's shard, returning θ_start − θ_end.

Any model of the zoo trains here (``logits = model(idx)``); a LoRA model trains only its adapters, and the
pseudo-gradient covers only them (:func:`diloco.lora.trainable_state`). On CUDA the forward pass runs under
bf16 autocast (the weights and AdamW stay fp32) and AdamW is the fused kernel; the CPU path is plain fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diloco.data import sample_batch
from diloco.lora import trainable_state
from diloco.models import lm_loss

_STATE_FIELDS = ("exp_avg", "exp_avg_sq", "step")


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    weight_decay: float = 0.1
    warmup: int = 0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("steps, batch_size and seq_len must be >= 1")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup, weight_decay and grad_clip must be >= 0")


@dataclasses.dataclass
class InnerResult:
    pseudo_gradient: dict[str, Tensor]
    loss_start: float
    loss_end: float
    steps: int
    tokens: int
    seconds: float
    optimizer_state: dict[str, Tensor]
    tokens_per_s: float = 0.0


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """bf16 on a CUDA device that supports it (tensor cores, half the activation memory), else None (fp32)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def fused_adamw_available(device: str | torch.device) -> bool:
    """Whether AdamW's fused kernel runs on ``device`` (CUDA; the CPU keeps the reference implementation,
    which is deterministic and what the tests pin)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def make_optimizer(model: nn.Module, cfg: InnerConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients, with weight decay on matrices and embeddings only
    (not on biases and norm gains). ``fused`` selects the fused CUDA kernel."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


def export_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                           copy: bool = True) -> dict[str, Tensor]:
    """AdamW state as a flat ``{"<param>.exp_avg"|".exp_avg_sq"|".step": tensor}`` dict on CPU. With
    ``copy=False`` the CPU tensors are the optimizer's own (no copy of the two moments): for an optimizer
    that is never stepped again."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p) if p.requires_grad else None
        if not state:
            continue
        for field in _STATE_FIELDS:
            t = state[field].detach().to("cpu")
            out[f"{name}.{field}"] = (t.clone() if copy else t).contiguous()
    return out


def import_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
    """Load a dict made by :func:`export_optimizer_state`; raises ValueError on unknown names or shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # The fused (and capturable) kernels keep the step count on the parameter's device, the others on the CPU.
    step_device = None if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable") else "cpu"
    expected = {f"{n}.{f}" for n in params for f in _STATE_FIELDS}
    unknown = sorted(set(flat) - expected)
    if unknown:
        raise ValueError(f"optimizer state has unknown entries: {', '.join(unknown[:5])}")
    for name, p in params.items():
        keys = [f"{name}.{f}" for f in _STATE_FIELDS]
        present = [k in flat for k in keys]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"optimizer state for {name} is incomplete")
        exp_avg, exp_avg_sq, step = (flat[k] for k in keys)
        if exp_avg.shape != p.shape or exp_avg_sq.shape != p.shape or step.numel() != 1:
            raise ValueError(f"optimizer state for {name} does not match the parameter's shape {tuple(p.shape)}")
        optimizer.state[p] = {
            "step": step.detach().to(dtype=torch.float32, device=step_device or p.device).reshape(()).clone(),
            "exp_avg": exp_avg.detach().to(p.device, p.dtype).clone(),
            "exp_avg_sq": exp_avg_sq.detach().to(p.device, p.dtype).clone(),
        }


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.to("cpu", torch.float32, copy=True) for k, v in trainable_state(model).items()}


def inner_train(
    model: nn.Module,
    tokens: Tensor,
    cfg: InnerConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    optimizer_state: dict[str, Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> InnerResult:
    """Train ``model`` in place for ``cfg.steps`` AdamW steps on random windows of ``tokens``.

    Warmup is linear over AdamW's own step count, so a worker that passes its previous
    ``optimizer_state`` back does not warm up again. ``loss_start`` and ``loss_end`` are the losses on
    the same (first) batch before and after training. ``model`` ends at θ_end. ``tokens`` is any 1-D
    tensor of token ids (bytes 0..255 or a tokenizer's ids below the model's vocabulary).
    """
    started = time.perf_counter()
    device = torch.device(device)
    model.to(device)
    model.train()
    theta_start = _snapshot(model)
    half = autocast_dtype(device)
    precision = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
    optimizer = make_optimizer(model, cfg, fused=fused_adamw_available(device))
    if optimizer_state:
        import_optimizer_state(model, optimizer, optimizer_state)
    params = [p for p in model.parameters() if p.requires_grad]
    batch_gen = torch.Generator().manual_seed(int(seed))
    first_batch = None
    loss_start = float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for step in range(1, cfg.steps + 1):
            x, y = sample_batch(tokens, cfg.batch_size, cfg.seq_len, batch_gen)
            x, y = x.to(device), y.to(device)
            if first_batch is None:
                first_batch = (x, y)
            with precision:
                loss = lm_loss(model, x, y)
            if step == 1:
                loss_start = float(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            adam_step = int(optimizer.state[params[0]]["step"]) + 1 if optimizer.state.get(params[0]) else 1
            scale = min(1.0, adam_step / cfg.warmup) if cfg.warmup > 0 else 1.0
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * scale
            optimizer.step()
            if progress is not None:
                progress(step, float(loss.item()))
        model.eval()
        with torch.no_grad(), precision:
            end_loss = lm_loss(model, *first_batch)
        model.train()
    theta_end = _snapshot(model)
    delta = {k: theta_start[k] - theta_end[k] for k in theta_start}
    seconds = time.perf_counter() - started
    trained = cfg.steps * cfg.batch_size * cfg.seq_len
    return InnerResult(
        pseudo_gradient=delta,
        loss_start=loss_start,
        loss_end=float(end_loss.item()),
        steps=cfg.steps,
        tokens=trained,
        seconds=seconds,
        # This call's optimizer is not used again: its state is handed over rather than copied.
        optimizer_state=export_optimizer_state(model, optimizer, copy=False),
        tokens_per_s=trained / max(seconds, 1e-9),
    )
