"""LoRA fine-tuning through ``peft``: adapters on chosen linear layers, the rest of the model frozen.

In a LoRA run the adapters are the only thing that trains: the pseudo-gradient, the outer step, the
screening and the run's checkpoints cover :func:`trainable_state` (peft's adapter state dict, the keys of an
``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``). The base
weights stay a fixed model version; :func:`merge_lora` folds adapters into a full state for sampling and
export.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings

import torch
from torch import Tensor, nn

# What a spec gets when it names no target modules: the attention input projections, as in the LoRA paper.
DEFAULT_TARGET_MODULES = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "byte-gpt": ("c_attn",)}

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapter rank ``r``, scale ``alpha`` (the update is ``B @ A × alpha / rank``), dropout on the adapter
    input, and the module names (or dotted suffixes) the adapters wrap."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 256:
            raise ValueError(f"lora rank must be an integer in 1..256, not {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 < self.alpha <= 4096:
            raise ValueError(f"lora alpha must be in (0, 4096], not {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), not {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, list | tuple) or not targets:
            raise ValueError("lora target_modules must be a non-empty list of module names")
        for name in targets:
            if not isinstance(name, str) or not _MODULE_NAME.match(name):
                raise ValueError(f"lora target_modules: {name!r} is not a module name")
        object.__setattr__(self, "target_modules", tuple(dict.fromkeys(targets)))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @classmethod
    def from_dict(cls, spec: dict, *, arch: str | None = None) -> LoraSpec:
        """A spec's ``lora`` object; ``target_modules`` defaults to :data:`DEFAULT_TARGET_MODULES` for ``arch``."""
        if not isinstance(spec, dict):
            raise ValueError("lora must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown lora keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = dict(spec)
        if "target_modules" not in values and arch in DEFAULT_TARGET_MODULES:
            values["target_modules"] = DEFAULT_TARGET_MODULES[arch]
        return cls(**values)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}


def apply_lora(model: nn.Module, spec: LoraSpec, *, seed: int = 0) -> nn.Module:
    """``model`` wrapped with adapters (a ``peft`` model; called as ``model(idx)`` like any other).

    Only the adapters require gradients. ``lora_A`` is drawn from ``seed`` (``lora_B`` starts at zero, so
    the wrapped model computes what ``model`` did); the global RNG is left untouched. Raises ValueError
    when no module matches ``spec.target_modules`` or a match is not a layer LoRA can wrap.
    """
    from peft import LoraConfig, get_peft_model

    # GPT-2 keeps its projections as Conv1D ([in, out] weights): peft must know to transpose.
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules()
                 if any(n == t or n.endswith("." + t) for t in spec.target_modules))
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none", fan_in_fan_out=conv1d)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question on every wrap; it is not ours to answer
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(int(seed))
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise ValueError(f"lora target_modules {list(spec.target_modules)}: {exc}") from exc


def is_lora_model(model: nn.Module) -> bool:
    # A process that never imported peft holds no peft model (and an agent without the hf extra has no peft).
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The weights a round trains, detached (not copied): the adapters of a LoRA model, else the whole
    state dict."""
    if is_lora_model(model):
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter weights (keys as :func:`trainable_state` gives them) into a LoRA model; ValueError
    on a missing, unexpected or mis-shaped tensor."""
    from peft import set_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in trainable_state(model).items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(state[name].shape)}, the model needs {shape}")
    set_peft_model_state_dict(model, {k: v.to(torch.float32) for k, v in state.items()})


def lora_model(arch: str, config: dict, base_state: dict[str, Tensor], spec: LoraSpec, *,
               adapter_state: dict[str, Tensor] | None = None, vocab_size: int | None = None,
               seed: int = 0) -> nn.Module:
    """A LoRA model over ``base_state`` (copied into fresh storage), with ``adapter_state`` if given,
    else adapters drawn from ``seed``."""
    from diloco.models import build_model

    model = build_model(arch, config, seed=None, vocab_size=vocab_size)
    model.load_state_dict(base_state, strict=True)
    model = apply_lora(model, spec, seed=seed)
    if adapter_state is not None:
        load_trainable_state(model, adapter_state)
    return model


def init_adapter_state(arch: str, config: dict, spec: LoraSpec, seed: int, *,
                       vocab_size: int | None = None) -> dict[str, Tensor]:
    """Fresh adapter weights (CPU, fp32) for a LoRA run, identical for the same seed; ``lora_B`` is zero,
    so the first version of a LoRA run is its base model."""
    from diloco.models import build_model

    model = apply_lora(build_model(arch, config, seed=None, vocab_size=vocab_size), spec, seed=seed)
    return {k: v.clone().contiguous() for k, v in trainable_state(model).items()}


@torch.no_grad()
def merge_lora(arch: str, config: dict, base_state: dict[str, Tensor], adapter_state: dict[str, Tensor],
               spec: LoraSpec, *, vocab_size: int | None = None) -> dict[str, Tensor]:
    """The full state (base keys, fp32) of ``base_state`` with ``adapter_state``'s adapters folded in:
    ``W + B @ A × alpha / rank`` on every wrapped layer. Deterministic."""
    model = lora_model(arch, config, base_state, spec, adapter_state=adapter_state, vocab_size=vocab_size)
    merged = model.merge_and_unload()
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in merged.state_dict().items()}
