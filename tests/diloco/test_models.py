import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diloco.models import GPTConfig, build_model, generate, init_state, lm_loss

ROOT = Path(__file__).resolve().parents[2]


def test_forward_shapes_and_loss(tiny_config):
    model = build_model("byte-gpt", tiny_config)
    idx = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (3, 20, 256)
    loss = lm_loss(model, idx, idx)
    # Fresh weights predict roughly uniformly over 256 bytes.
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_causal_no_peeking(tiny_config):
    model = build_model("byte-gpt", tiny_config).eval()
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    a = model(idx)
    b = model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_init_state_deterministic_by_seed(tiny_config):
    a = init_state("byte-gpt", tiny_config, seed=3)
    b = init_state("byte-gpt", tiny_config, seed=3)
    c = init_state("byte-gpt", tiny_config, seed=4)
    assert a.keys() == b.keys() == set(build_model("byte-gpt", tiny_config).state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Initialisation does not consume the global RNG.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    init_state("byte-gpt", tiny_config, seed=5)
    assert torch.equal(torch.rand(1), expected)


def test_too_long_sequence_rejected(tiny_config):
    model = build_model("byte-gpt", tiny_config)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    ("arch", "config", "message"),
    [
        ("transformer-xl", {}, "unknown model arch"),
        ("byte-gpt", {"n_layers": 2}, "unknown byte-gpt config keys: n_layers"),
        ("byte-gpt", {"n_embd": 30, "n_head": 4}, "divisible"),
        ("byte-gpt", {"n_layer": 0}, "n_layer must be a positive integer"),
        ("byte-gpt", {"dropout": 1.5}, "dropout"),
    ],
)
def test_build_model_rejects(arch, config, message):
    with pytest.raises(ValueError, match=message):
        build_model(arch, config)


def test_gptconfig_defaults():
    assert GPTConfig() == GPTConfig(vocab_size=256, n_layer=2, n_embd=64, n_head=4, block_size=64, dropout=0.0)


def test_generate_is_seeded_and_returns_new_bytes(tiny_config):
    model = build_model("byte-gpt", tiny_config)
    a = generate(model, b"hello", max_new_tokens=50, seed=1)
    b = generate(model, b"hello", max_new_tokens=50, seed=1)
    c = generate(model, b"hello", max_new_tokens=50, seed=2)
    assert isinstance(a, bytes) and len(a) == 50
    assert a == b != c
    assert generate(model, b"", max_new_tokens=5) is not None
    assert len(generate(model, b"x" * 100, max_new_tokens=3)) == 3  # prompt longer than the context
    greedy = generate(model, b"ab", max_new_tokens=10, temperature=0)
    assert greedy == generate(model, b"ab", max_new_tokens=10, temperature=0, seed=9)
    a.decode("utf-8", errors="replace")


def test_generate_top_k_one_is_greedy(tiny_config):
    model = build_model("byte-gpt", tiny_config)
    assert generate(model, b"abc", max_new_tokens=12, top_k=1, seed=4) == generate(
        model, b"abc", max_new_tokens=12, temperature=0
    )


def test_no_django_imports():
    offenders = [
        str(p) for p in (ROOT / "diloco").rglob("*.py")
        if "import django" in p.read_text() or "from django" in p.read_text()
    ]
    assert offenders == []
    code = "import sys; sys.modules['django'] = None; import diloco.models, diloco.aggregate, diloco.codecs; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_after_warm_up_model_with_weights_works(tiny_config):
    from diloco.models import model_with_weights, warm_up

    warm_up()
    state = init_state("byte-gpt", tiny_config, seed=0)
    logits = model_with_weights("byte-gpt", tiny_config, state)(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, 256)


LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32}
GPT2 = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32}
CONFIGS = {"byte-gpt": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}, "llama": LLAMA, "gpt2": GPT2}


@pytest.mark.parametrize("arch", ["byte-gpt", "llama", "gpt2"])
def test_every_arch_is_called_the_same_way_and_counted_without_building(arch):
    from diloco.models import context_length, param_count

    config = CONFIGS[arch]
    model = build_model(arch, config, seed=0)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert model(idx).shape == (2, 12, 256)
    assert abs(lm_loss(model, idx, idx).item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    assert param_count(arch, config) == sum(p.numel() for p in model.parameters())
    assert param_count(arch, config, vocab_size=1000) == sum(
        p.numel() for p in build_model(arch, config, vocab_size=1000).parameters())
    assert context_length(model) == 32
    assert len(generate(model, b"ab", max_new_tokens=4, top_p=0.9)) == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_models_keep_hugging_face_names_and_a_seeded_init(arch):
    config = CONFIGS[arch]
    a, b, c = (init_state(arch, config, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert "lm_head.weight" in a and ("model.embed_tokens.weight" in a or "transformer.wte.weight" in a)
    embed = a.get("model.embed_tokens.weight", a.get("transformer.wte.weight"))
    assert embed.data_ptr() != a["lm_head.weight"].data_ptr()  # untied: each tensor owns its storage
    # The global RNG is not consumed.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    init_state(arch, config, seed=5)
    assert torch.equal(torch.rand(1), expected)


def test_vocab_size_overrides_the_config_for_a_bpe_tokenizer():
    model = build_model("llama", LLAMA, vocab_size=300)
    assert model(torch.tensor([[299, 1]])).shape == (1, 2, 300)


def test_model_with_weights_shares_hf_tensors():
    from diloco.models import model_with_weights

    state = init_state("llama", LLAMA, seed=1)
    model = model_with_weights("llama", LLAMA, state)
    assert model.get_parameter("lm_head.weight").data_ptr() == state["lm_head.weight"].data_ptr()
    x = torch.randint(0, 256, (1, 8))
    reference = build_model("llama", LLAMA, seed=1).eval()
    assert torch.allclose(model.eval()(x), reference(x))


@pytest.mark.parametrize(("arch", "config", "message"), [
    ("llama", {"hidden_size": 30}, "hidden_size .*divisible by num_attention_heads"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads .*must divide"),
    ("llama", {"num_hidden_layers": 0}, "num_hidden_layers must be between"),
    ("llama", {"rope_theta": -1}, "rope_theta"),
    ("llama", {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 128}, "over the limit"),
    ("llama", {"hidden_size": "64"}, "hidden_size must be an integer"),
    ("llama", {"n_embd": 64}, "unknown llama config keys: n_embd"),
    ("gpt2", {"n_embd": 30, "n_head": 4}, "n_embd .*divisible by n_head"),
    ("gpt2", {"n_positions": 10**9}, "n_positions"),
    ("gpt2", {"activation_function": "swish2"}, "activation_function"),
    ("byte-gpt", {"block_size": 10**6}, "block_size"),
    ("mamba", {}, "unknown model arch"),
])
def test_validate_model_config_names_the_bad_key(arch, config, message):
    from diloco.models import validate_model_config

    with pytest.raises(ValueError, match=message):
        validate_model_config(arch, config)


def test_validate_model_config_fills_defaults_and_is_json():
    import json

    from diloco.models import validate_model_config

    config = validate_model_config("llama", {"hidden_size": 48, "num_attention_heads": 6}, vocab_size=300)
    assert config["num_key_value_heads"] == 6 and config["head_dim"] == 8 and config["vocab_size"] == 300
    assert json.loads(json.dumps(config)) == config
    assert validate_model_config("llama", config) == config  # idempotent


def test_generate_tokens_stops_and_top_p_narrows():
    from diloco.models import generate_tokens

    model = build_model("llama", LLAMA, seed=0)
    greedy = list(generate_tokens(model, [1, 2], max_new_tokens=6, temperature=0))
    assert list(generate_tokens(model, [1, 2], max_new_tokens=6, top_p=1e-6, seed=3)) == greedy
    assert list(generate_tokens(model, [1, 2], max_new_tokens=6, temperature=0, stop={greedy[0]})) == greedy[:1]
    with pytest.raises(ValueError, match="top_p"):
        list(generate_tokens(model, [1], max_new_tokens=1, top_p=0))


def _save_hf(tmp_path, arch, config, *, tie=False, sharded=False):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, tie_word_embeddings=tie, **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    return model


@pytest.mark.parametrize(("arch", "config", "tie", "sharded"), [
    ("llama", LLAMA, False, True), ("llama", {**LLAMA, "vocab_size": 300}, True, False), ("gpt2", GPT2, True, False),
])
def test_load_hf_directory_reads_what_transformers_saved(tmp_path, arch, config, tie, sharded):
    from diloco.models import load_hf_directory

    saved = _save_hf(tmp_path, arch, config, tie=tie, sharded=sharded)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    got_arch, got_config, state = load_hf_directory(tmp_path)
    assert got_arch == arch
    ours = build_model(got_arch, got_config, seed=None)
    ours.load_state_dict(state)
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), saved.eval()(x).logits, atol=1e-5)


def test_load_hf_directory_errors_name_the_problem(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from diloco.models import load_hf_directory

    with pytest.raises(ValueError, match="no config.json"):
        load_hf_directory(tmp_path)
    _save_hf(tmp_path, "llama", LLAMA)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        load_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "hidden_size": 48}))
    with pytest.raises(ValueError, match="shape"):
        load_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lack 1 tensors.*model.norm.weight"):
        load_hf_directory(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        load_hf_directory(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_sampling_matches_full_recomputation_past_the_context(monkeypatch, arch):
    from diloco.models import generate_tokens

    model = build_model(arch, CONFIGS[arch], seed=0)
    cached = list(generate_tokens(model, [1, 2, 3], max_new_tokens=45, temperature=0))  # context is 32
    monkeypatch.delattr(type(model), "logits_with_cache")
    assert list(generate_tokens(model, [1, 2, 3], max_new_tokens=45, temperature=0)) == cached


def test_load_hf_directory_reads_openai_style_gpt2_checkpoints(tmp_path):
    """distilgpt2 / gpt2 on the hub: keys without the ``transformer.`` prefix and saved causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    from diloco.models import load_hf_directory

    saved = _save_hf(tmp_path, "gpt2", GPT2, tie=True)
    weights = load_file(str(tmp_path / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in weights.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(legacy, str(tmp_path / "model.safetensors"))
    arch, config, state = load_hf_directory(tmp_path)
    ours = build_model(arch, config, seed=None)
    ours.load_state_dict(state)
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), saved.eval()(x).logits, atol=1e-5)
