"""The community model zoo. For now one architecture: ``byte-gpt``, a small byte-level GPT.

Weights are not tied (input embedding and output head are separate tensors) so that every state dict
entry owns its storage and can be written as safetensors without de-duplication.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHES = ("byte-gpt",)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.dropout, int | float) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")

    @classmethod
    def from_dict(cls, config: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown byte-gpt config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**config)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ByteGPT(nn.Module):
    """Pre-LayerNorm GPT over bytes (vocabulary 256)."""

    def __init__(self, cfg: GPTConfig, *, seed: int | None = 0):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if seed is not None:  # None: the caller loads weights (see model_with_weights)
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 initialisation drawn from a private generator: same seed, same weights, no global RNG use."""
        gen = torch.Generator().manual_seed(int(seed))
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = proj_std if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def build_model(arch: str, config: dict, *, seed: int = 0) -> nn.Module:
    """Build a model of architecture ``arch`` from a config dict; weights initialised from ``seed``.

    The global RNG is left untouched (the layers' default initialisation runs on a forked RNG and is
    then overwritten from a private generator).
    """
    if arch != "byte-gpt":
        raise ValueError(f"unknown model arch {arch!r} (known: {', '.join(ARCHES)})")
    if not isinstance(config, dict):
        raise ValueError("model config must be a dict")
    cfg = GPTConfig.from_dict(config)
    with torch.random.fork_rng(devices=[]):
        return ByteGPT(cfg, seed=seed)


def warm_up() -> None:
    """Pay once, up front, what the first :func:`model_with_weights` in a process costs (about 1.5 s:
    torch loads its meta-device support on first use)."""
    with torch.device("meta"):
        ByteGPT(GPTConfig.from_dict({"n_layer": 1, "n_embd": 8, "n_head": 1, "block_size": 8}), seed=None)


def model_with_weights(arch: str, config: dict, state: dict[str, Tensor]) -> nn.Module:
    """A model whose parameters *are* ``state``'s tensors (shared, not copied), built without drawing
    initial weights. Much cheaper than :func:`build_model` plus ``load_state_dict`` for a large model;
    meant for inference on weights that nobody modifies. Names and shapes must match exactly."""
    if arch != "byte-gpt":
        raise ValueError(f"unknown model arch {arch!r} (known: {', '.join(ARCHES)})")
    if not isinstance(config, dict):
        raise ValueError("model config must be a dict")
    with torch.device("meta"):
        model = ByteGPT(GPTConfig.from_dict(config), seed=None)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def init_state(arch: str, config: dict, seed: int) -> dict[str, Tensor]:
    """Fresh weights for ``arch``/``config`` (CPU, fp32), identical for the same seed."""
    model = build_model(arch, config, seed=seed)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: bytes,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 40,
    seed: int = 0,
) -> bytes:
    """Sample ``max_new_tokens`` bytes after ``prompt`` and return only the new bytes.

    ``temperature == 0`` is greedy decoding. The bytes need not be valid UTF-8; decode them with
    ``errors="replace"``. An empty prompt starts from a newline byte (not returned).
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be >= 1 or None")
    device = next(model.parameters()).device
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(int(seed))
    context = list(prompt) or [10]
    idx = torch.tensor([context[-block_size:]], dtype=torch.long, device=device)
    out = bytearray()
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            out.append(int(nxt.item()))
            idx = torch.cat([idx, nxt], dim=1)
    finally:
        model.train(was_training)
    return bytes(out)
