"""Deterministic held-out loss."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from diloco.models import lm_loss

PRECISIONS = ("auto", "fp32", "bf16")


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (CUDA with bf16, or a CPU with
    AVX512-BF16 / AMX). Elsewhere bf16 is emulated and slower than fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def eval_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``, ``fp32`` or ``bf16``) on ``device``; None is fp32.

    ``auto`` uses bf16 where the hardware runs it natively: the forward pass is then 3-4x faster on such
    a CPU, and the loss differs from fp32's in the fifth significant digit.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"evaluation precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.bfloat16
    return None


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    tokens: Tensor,
    *,
    batch_size: int,
    seq_len: int,
    batches: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over ``batches × batch_size`` windows spread evenly over ``tokens``.

    The windows are evenly spaced (offset by a ``seed``-derived shift), so the same model, tokens and
    arguments always give the same value, and the estimate covers the whole held-out text. With
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) the forward pass runs under autocast; the loss is still
    reduced in fp32.
    """
    n = tokens.numel()
    if n < seq_len + 1:
        raise ValueError(f"evaluation corpus has {n} tokens, needs at least seq_len + 1 = {seq_len + 1}")
    count = batch_size * batches
    last_start = n - seq_len - 1
    stride = last_start / count
    shift = float(torch.rand((), generator=torch.Generator().manual_seed(int(seed)))) * stride
    starts = (torch.arange(count, dtype=torch.float64) * stride + shift).long().clamp_(0, last_start)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    device = torch.device(device)
    precision = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with precision:
            for b in range(batches):
                w = windows[b * batch_size : (b + 1) * batch_size].to(device)
                loss = lm_loss(model, w[:, :-1], w[:, 1:])
                total += float(loss.float().item())
    finally:
        model.train(was_training)
    return total / batches
