"""Deterministic held-out loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
) -> float:
    """Mean next-byte cross-entropy over ``batches × batch_size`` windows spread evenly over ``tokens``.

    The windows are evenly spaced (offset by a ``seed``-derived shift), so the same model, tokens and
    arguments always give the same value, and the estimate covers the whole held-out text.
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
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for b in range(batches):
            w = windows[b * batch_size : (b + 1) * batch_size].to(device)
            _, loss = model(w[:, :-1], w[:, 1:])
            total += float(loss.item())
    finally:
        model.train(was_training)
    return total / batches
