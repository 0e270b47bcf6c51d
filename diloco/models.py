"""The community model zoo: ``byte-gpt`` (our own small GPT) and Hugging Face causal LMs (``llama``, ``gpt2``).

Every model is called the same way by the inner loop, the evaluation and the sampler:
``logits = model(idx)`` (LongTensor ``[B, T]`` to ``[B, T, V]``). A Hugging Face model is its own
``transformers`` class with only ``forward`` narrowed to that call, so its state dict keys are exactly the
Hugging Face ones and exporting it is a plain save.

Weights are never tied (input embedding and output head are separate tensors) so that every state dict
entry owns its storage and can be written as safetensors without de-duplication.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHES = ("byte-gpt", "llama", "gpt2")
HF_ARCHES = ("llama", "gpt2")

# The largest model a spec may ask for: a 1-3B Llama imports and trains; 1e12 parameters does not.
MAX_PARAMS = 4_000_000_000


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --- configs ------------------------------------------------------------------------------------

_INT, _FLOAT, _BOOL, _CHOICE, _OPT_INT = "int", "float", "bool", "choice", "optional int"

# key: (kind, default, low, high) — for "choice", low is the tuple of allowed values.
_SCHEMAS: dict[str, dict[str, tuple]] = {
    "byte-gpt": {
        "vocab_size": (_INT, 256, 2, 262_144),
        "n_layer": (_INT, 2, 1, 48),
        "n_embd": (_INT, 64, 8, 4096),
        "n_head": (_INT, 4, 1, 64),
        "block_size": (_INT, 64, 8, 4096),
        "dropout": (_FLOAT, 0.0, 0.0, 0.9),
    },
    "llama": {
        "vocab_size": (_INT, 256, 2, 262_144),
        "hidden_size": (_INT, 64, 8, 16_384),
        "intermediate_size": (_INT, 176, 8, 65_536),
        "num_hidden_layers": (_INT, 2, 1, 128),
        "num_attention_heads": (_INT, 4, 1, 128),
        "num_key_value_heads": (_OPT_INT, None, 1, 128),
        "head_dim": (_OPT_INT, None, 4, 512),
        "max_position_embeddings": (_INT, 256, 8, 131_072),
        "rope_theta": (_FLOAT, 10_000.0, 1.0, 1e9),
        "rms_norm_eps": (_FLOAT, 1e-5, 1e-12, 1e-2),
        "hidden_act": (_CHOICE, "silu", ("silu", "gelu", "gelu_pytorch_tanh", "relu"), None),
        "attention_bias": (_BOOL, False, None, None),
        "mlp_bias": (_BOOL, False, None, None),
    },
    "gpt2": {
        "vocab_size": (_INT, 256, 2, 262_144),
        "n_embd": (_INT, 64, 8, 16_384),
        "n_layer": (_INT, 2, 1, 128),
        "n_head": (_INT, 4, 1, 128),
        "n_positions": (_INT, 256, 8, 32_768),
        "n_inner": (_OPT_INT, None, 8, 65_536),
        "activation_function": (_CHOICE, "gelu_new", ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu"), None),
        "layer_norm_epsilon": (_FLOAT, 1e-5, 1e-12, 1e-2),
    },
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ValueError(f"unknown model arch {arch!r} (known: {', '.join(ARCHES)})")


def _coerce(arch: str, key: str, value, schema: tuple):
    kind, _default, low, high = schema
    where = f"{arch} config key {key}"
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, not {value!r}")
        return value
    if kind == _CHOICE:
        if value not in low:
            raise ValueError(f"{where} must be one of {', '.join(low)}, not {value!r}")
        return value
    if kind == _OPT_INT and value is None:
        return None
    if kind in (_INT, _OPT_INT):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, not {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where} must be a number, not {value!r}")
        value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{where} must be between {low} and {high}, not {value!r}")
    return value


def validate_model_config(arch: str, config: dict, *, vocab_size: int | None = None) -> dict:
    """``config`` checked and completed with defaults, as a new dict (JSON-serialisable).

    Raises ValueError naming the key for an unknown key, a wrong type, a value out of bounds, heads that
    do not divide the width, or a model over :data:`MAX_PARAMS` parameters. ``vocab_size`` (a BPE
    tokenizer's) overrides the config's.
    """
    _check_arch(arch)
    if not isinstance(config, dict):
        raise ValueError("model config must be a dict")
    schema = _SCHEMAS[arch]
    unknown = sorted(set(config) - set(schema))
    if unknown:
        raise ValueError(f"unknown {arch} config keys: {', '.join(unknown)} (known: {', '.join(sorted(schema))})")
    merged = {**config, **({"vocab_size": vocab_size} if vocab_size is not None else {})}
    out = {key: _coerce(arch, key, merged[key], spec) if key in merged else spec[1] for key, spec in schema.items()}
    if arch in ("byte-gpt", "gpt2") and out["n_embd"] % out["n_head"]:
        raise ValueError(f"{arch} config key n_embd ({out['n_embd']}) must be divisible by n_head ({out['n_head']})")
    if arch == "llama":
        heads = out["num_attention_heads"]
        if out["num_key_value_heads"] is None:
            out["num_key_value_heads"] = heads
        if heads % out["num_key_value_heads"]:
            raise ValueError(f"llama config key num_key_value_heads ({out['num_key_value_heads']}) must divide "
                             f"num_attention_heads ({heads})")
        if out["head_dim"] is None:
            if out["hidden_size"] % heads:
                raise ValueError(f"llama config key hidden_size ({out['hidden_size']}) must be divisible by "
                                 f"num_attention_heads ({heads})")
            out["head_dim"] = out["hidden_size"] // heads
        if out["head_dim"] % 2:
            raise ValueError(f"llama config key head_dim ({out['head_dim']}) must be even (rotary embeddings)")
    count = _param_count(arch, out)
    if count > MAX_PARAMS:
        raise ValueError(f"{arch} config asks for {count:,} parameters, over the limit of {MAX_PARAMS:,}")
    return out


def _param_count(arch: str, c: dict) -> int:
    v = c["vocab_size"]
    if arch == "byte-gpt":
        d, n_layer = c["n_embd"], c["n_layer"]
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        return v * d + c["block_size"] * d + n_layer * block + 2 * d + d * v
    if arch == "gpt2":
        d, inner = c["n_embd"], c["n_inner"] or 4 * c["n_embd"]
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        return v * d + c["n_positions"] * d + c["n_layer"] * block + 2 * d + d * v
    d, inner, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv + d) if c["attention_bias"] else 0)
    mlp = 3 * d * inner + ((2 * inner + d) if c["mlp_bias"] else 0)
    return v * d + c["num_hidden_layers"] * (attn + mlp + 2 * d) + d + d * v


def param_count(arch: str, config: dict, vocab_size: int | None = None) -> int:
    """The number of parameters ``build_model(arch, config, vocab_size=...)`` would have, without building it."""
    return _param_count(arch, validate_model_config(arch, config, vocab_size=vocab_size))


# --- Hugging Face models ------------------------------------------------------------------------


def hf_config(arch: str, config: dict, *, vocab_size: int | None = None):
    """The ``transformers`` config for a normalised Agora ``config`` (untied weights, SDPA attention)."""
    from transformers import AutoConfig

    if arch not in HF_ARCHES:
        raise ValueError(f"{arch!r} is not a Hugging Face architecture (those are: {', '.join(HF_ARCHES)})")
    c = validate_model_config(arch, config, vocab_size=vocab_size)
    kwargs = dict(c)
    if arch == "llama":
        theta = kwargs.pop("rope_theta")
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    # No special tokens by default: GPT-2's 50256 and Llama's 1/2 need not exist in a small vocabulary.
    kwargs.update(tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt2":  # GPT-2's default 10% dropouts make training non-deterministic; DiLoCo pretrains without
        kwargs.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    cfg = AutoConfig.for_model(arch, **kwargs)
    cfg._attn_implementation = "sdpa"
    return cfg


@functools.cache
def _logits_class(hf_class: type) -> type:
    """``hf_class`` whose ``forward(idx)`` returns the logits tensor; everything else (state dict keys,
    ``save_pretrained``'s weights, PEFT's module names) is the Hugging Face class's own."""

    class LogitsOnly(hf_class):
        def forward(self, input_ids=None, **kwargs):
            kwargs.setdefault("use_cache", False)
            return super().forward(input_ids=input_ids, **kwargs).logits

        def logits_with_cache(self, input_ids, past_key_values=None):
            """Logits of ``input_ids`` following the cached positions, and the cache extended by them."""
            out = super().forward(input_ids=input_ids, past_key_values=past_key_values, use_cache=True)
            return out.logits, out.past_key_values

    LogitsOnly.__name__ = LogitsOnly.__qualname__ = f"Agora{hf_class.__name__}"
    return LogitsOnly


def _hf_model(arch: str, config: dict, *, vocab_size: int | None, seed: int | None) -> nn.Module:
    from transformers.initialization import no_init_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = hf_config(arch, config, vocab_size=vocab_size)
    cls = _logits_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)])
    with torch.random.fork_rng(devices=[]):
        if seed is None:  # the caller loads weights: skip drawing them
            with no_init_weights():
                model = cls(cfg)
        else:
            torch.manual_seed(int(seed))
            model = cls(cfg)
    return model.float()


def is_hf_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # never imported: no Hugging Face model exists
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


# --- building -----------------------------------------------------------------------------------


def build_model(arch: str, config: dict, *, seed: int | None = 0, vocab_size: int | None = None) -> nn.Module:
    """Build a model of architecture ``arch`` from a config dict; weights initialised from ``seed``
    (``None``: not drawn at all, for a caller that loads weights next).

    ``vocab_size`` (a BPE tokenizer's) overrides the config's. The global RNG is left untouched.
    """
    _check_arch(arch)
    if not isinstance(config, dict):
        raise ValueError("model config must be a dict")
    if arch in HF_ARCHES:
        return _hf_model(arch, config, vocab_size=vocab_size, seed=seed)
    cfg = GPTConfig.from_dict({**config, **({"vocab_size": vocab_size} if vocab_size is not None else {})})
    with torch.random.fork_rng(devices=[]):
        return ByteGPT(cfg, seed=seed)


def warm_up() -> None:
    """Pay once, up front, what the first :func:`model_with_weights` in a process costs (about 1.5 s:
    torch loads its meta-device support on first use)."""
    with torch.device("meta"):
        ByteGPT(GPTConfig.from_dict({"n_layer": 1, "n_embd": 8, "n_head": 1, "block_size": 8}), seed=None)


def model_with_weights(arch: str, config: dict, state: dict[str, Tensor], *,
                       vocab_size: int | None = None) -> nn.Module:
    """A model whose parameters *are* ``state``'s tensors (shared, not copied), built without drawing
    initial weights. Much cheaper than :func:`build_model` plus ``load_state_dict`` for a large model;
    meant for inference on weights that nobody modifies. Names and shapes must match exactly."""
    _check_arch(arch)
    if not isinstance(config, dict):
        raise ValueError("model config must be a dict")
    if arch in HF_ARCHES:
        model = _hf_model(arch, config, vocab_size=vocab_size, seed=None)
    else:
        cfg = GPTConfig.from_dict({**config, **({"vocab_size": vocab_size} if vocab_size is not None else {})})
        with torch.device("meta"):
            model = ByteGPT(cfg, seed=None)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def init_state(arch: str, config: dict, seed: int, vocab_size: int | None = None) -> dict[str, Tensor]:
    """Fresh weights for ``arch``/``config`` (CPU, fp32), identical for the same seed."""
    model = build_model(arch, config, seed=seed, vocab_size=vocab_size)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def context_length(model: nn.Module) -> int:
    """The longest sequence ``model`` takes (``block_size``, ``max_position_embeddings`` or ``n_positions``)."""
    cfg = model.config
    for name in ("block_size", "max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the context length of {type(model).__name__}")


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) of ``model`` on inputs ``x`` and targets ``y`` (both [B, T], any
    integer dtype: shards keep ids as uint8/uint16/int32), reduced in fp32 whatever dtype the forward pass
    ran in."""
    logits = model(x.long())
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1).long())


# --- importing a Hugging Face directory ---------------------------------------------------------

_HF_IMPORT_KEYS = {
    "llama": {"rope_scaling", "tie_word_embeddings", "rope_parameters"} | set(_SCHEMAS["llama"]),
    "gpt2": {"tie_word_embeddings"} | set(_SCHEMAS["gpt2"]),
}


def _config_from_hf_json(raw: dict) -> tuple[str, dict, bool]:
    model_type = raw.get("model_type")
    if model_type not in HF_ARCHES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(HF_ARCHES)})")
    schema = _SCHEMAS[model_type]
    config = {k: raw[k] for k in schema if k in raw and k != "rope_theta"}
    if model_type == "llama":
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError("config.json: rope_parameters must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is not None:
            config["rope_theta"] = theta
        if raw.get("pretraining_tp", 1) != 1:
            raise ValueError("config.json: pretraining_tp other than 1 is not supported")
    try:
        config = validate_model_config(model_type, config)
    except ValueError as exc:
        raise ValueError(f"config.json: {exc}") from exc
    return model_type, config, bool(raw.get("tie_word_embeddings", model_type == "gpt2"))


def _read_hf_weights(path) -> dict[str, Tensor]:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"model.safetensors.index.json is malformed: {exc}") from exc
        files = []
        for name in names:
            shard = (path / name).resolve()
            if shard.parent != path.resolve() or not shard.is_file():
                raise ValueError(f"model.safetensors.index.json names a missing or outside shard {name!r}")
            files.append(shard)
    else:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = f" (found {', '.join(found)}: pickled weights are never loaded; convert them to safetensors)" if found else ""
        raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json{hint}")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{file.name} is not a readable safetensors file: {exc}") from exc
    return state


def load_hf_directory(path) -> tuple[str, dict, dict[str, Tensor]]:
    """``(arch, config, state)`` of a saved Hugging Face model directory (``config.json`` and
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``).

    ``config`` is a normalised Agora config; ``state`` has exactly :func:`build_model`'s keys and shapes
    in fp32 (tied output weights are untied into a copy; a checkpoint's ``model.`` / ``transformer.``
    prefix conventions are the Hugging Face ones). Raises ValueError for a missing file, an unsupported
    ``model_type`` or setting, and a missing, unexpected or mis-shaped tensor.
    """
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("config.json must be a JSON object")
    arch, config, tied = _config_from_hf_json(raw)
    state = _read_hf_weights(path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in _hf_model(arch, config, vocab_size=None, seed=None).state_dict().items()}
    if arch == "gpt2":  # OpenAI's GPT-2 checkpoints: no "transformer." prefix, causal-mask buffers saved
        state = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
                 for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if "lm_head.weight" not in state and tied:
        embed = "model.embed_tokens.weight" if arch == "llama" else "transformer.wte.weight"
        if embed in state:
            state["lm_head.weight"] = state[embed].clone()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"the weights lack {len(missing)} tensors the config needs: {', '.join(missing[:5])}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"the weights have {len(unexpected)} tensors the config does not: {', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(state[name].shape)}, the config needs {shape}")
        if not state[name].dtype.is_floating_point:
            raise ValueError(f"tensor {name} is {state[name].dtype}, not floating point")
    out = {k: state[k].to(torch.float32).contiguous() for k in expected}
    for name, t in out.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"tensor {name} has non-finite values")
    return arch, config, out


# --- sampling -----------------------------------------------------------------------------------


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float | None = None,
    seed: int = 0,
    stop: Iterable[int] = (),
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` sampled token ids after ``prompt`` (one at a time, for streaming).

    ``temperature == 0`` is greedy decoding; ``top_k`` keeps the k likeliest tokens, ``top_p`` the smallest
    set whose probability reaches p (nucleus). Sampling stops early after a token in ``stop``. The context
    is the last :func:`context_length` tokens. Same model, prompt and seed: same tokens.
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be >= 1 or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1] or None")
    if not prompt:
        raise ValueError("the prompt must have at least one token")
    stop = set(stop)
    device = next(model.parameters()).device
    window = context_length(model)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(int(seed))
    idx = torch.tensor([list(prompt)[-window:]], dtype=torch.long, device=device)
    # Hugging Face models keep a key/value cache: each new token costs one position, not the whole context.
    # Past the context length the cache is dropped and the last window recomputed.
    with_cache = getattr(model, "logits_with_cache", None)
    past, fed = None, 0
    try:
        for _ in range(max_new_tokens):
            if with_cache is None:
                logits = model(idx[:, -window:])[:, -1, :].float()
            else:
                if idx.size(1) > window:
                    idx, past, fed = idx[:, -window:], None, 0
                step_logits, past = with_cache(idx[:, fed:], past)
                fed = idx.size(1)
                logits = step_logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if top_p is not None and top_p < 1.0:
                    sorted_logits, order = torch.sort(logits, descending=True)
                    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                    drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first past p
                    logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            token = int(nxt.item())
            yield token
            if token in stop:
                return
            idx = torch.cat([idx, nxt], dim=1)
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    prompt: bytes,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float | None = None,
    seed: int = 0,
) -> bytes:
    """Sample ``max_new_tokens`` bytes after ``prompt`` with a byte-level model; return only the new bytes.

    ``temperature == 0`` is greedy decoding. The bytes need not be valid UTF-8; decode them with
    ``errors="replace"``. An empty prompt starts from a newline byte (not returned).
    """
    tokens = generate_tokens(model, list(prompt) or [10], max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed)
    return bytes(tokens)
