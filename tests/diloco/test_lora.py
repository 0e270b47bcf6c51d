"""LoRA adapters: what trains, what a round ships, and the merge that the playground and export use."""

from __future__ import annotations

import pytest
import torch

from diloco.lora import (
    DEFAULT_TARGET_MODULES,
    LoraSpec,
    apply_lora,
    init_adapter_state,
    load_trainable_state,
    lora_model,
    merge_lora,
    trainable_state,
)
from diloco.models import build_model, init_state

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32}
CONFIGS = {"llama": LLAMA, "gpt2": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32},
           "byte-gpt": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}}


@pytest.mark.parametrize(("spec", "message"), [
    ({"rank": 0}, "rank"), ({"rank": True}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": "q_proj"}, "target_modules"),
    ({"target_modules": ["q proj"]}, "not a module name"), ({"rnak": 4}, "unknown lora keys: rnak"),
])
def test_spec_validation_names_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        LoraSpec.from_dict(spec, arch="llama")


def test_spec_defaults_per_arch_and_round_trips():
    spec = LoraSpec.from_dict({"rank": 4}, arch="gpt2")
    assert spec.target_modules == DEFAULT_TARGET_MODULES["gpt2"]
    assert LoraSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("arch", ["llama", "gpt2", "byte-gpt"])
def test_fresh_adapters_leave_the_base_model_unchanged_and_merge_exactly(arch):
    config = CONFIGS[arch]
    spec = LoraSpec.from_dict({"rank": 2, "alpha": 4}, arch=arch)
    base = init_state(arch, config, seed=0)
    adapters = init_adapter_state(arch, config, spec, seed=1)
    assert adapters.keys() == init_adapter_state(arch, config, spec, seed=1).keys()
    assert all(torch.equal(v, init_adapter_state(arch, config, spec, seed=1)[k]) for k, v in adapters.items())
    assert all(v.abs().sum() == 0 for k, v in adapters.items() if ".lora_B." in k)
    merged = merge_lora(arch, config, base, adapters, spec)
    assert merged.keys() == base.keys() and all(torch.equal(merged[k], base[k]) for k in base)

    # Trained adapters: the merged full model computes what base + adapters compute.
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
               for k, v in adapters.items()}
    merged = merge_lora(arch, config, base, trained, spec)
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert all(torch.equal(merged[k], v) for k, v in merge_lora(arch, config, base, trained, spec).items())
    full = build_model(arch, config, seed=None)
    full.load_state_dict(merged)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = lora_model(arch, config, base, spec, adapter_state=trained).eval()(x)
        assert torch.allclose(full.eval()(x), adapted, atol=1e-5)


def test_only_adapters_require_gradients_and_the_global_rng_is_untouched():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    model = apply_lora(build_model("llama", LLAMA), LoraSpec(rank=2, target_modules=("q_proj",)), seed=3)
    assert torch.equal(torch.rand(1), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert set(trainable_state(model)) == {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"}


def test_targets_that_match_nothing_and_adapters_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(build_model("llama", LLAMA), LoraSpec(rank=2, target_modules=("c_attn",)))
    spec = LoraSpec(rank=2, target_modules=("q_proj",))
    model = apply_lora(build_model("llama", LLAMA), spec)
    state = trainable_state(model)
    wrong = {k: torch.zeros(3, 3) for k in state}
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, wrong)
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, {})
