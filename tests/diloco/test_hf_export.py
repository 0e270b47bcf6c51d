"""Export to a Hugging Face directory: transformers loads it, generates, and computes our logits."""

from __future__ import annotations

import json

import pytest
import torch

from diloco.hf_export import byte_gpt_to_gpt2, byte_tokenizer_json, export_hf_directory
from diloco.models import build_model, init_state, load_hf_directory

BYTE = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 20


def _ours(arch, config, state, vocab_size=None):
    model = build_model(arch, config, seed=None, vocab_size=vocab_size)
    model.load_state_dict(state)
    return model.eval()


def test_byte_gpt_exports_as_gpt2_with_the_same_logits_and_a_byte_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = init_state("byte-gpt", BYTE, seed=4)
    out = export_hf_directory(tmp_path / "m", arch="byte-gpt", config=BYTE, state=state, tokenizer_json=None,
                              model_card="# byte model\n\nversion 3")
    assert (out / "README.md").read_text().startswith("# byte model")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, _ours("byte-gpt", BYTE, state)(x), atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    text = "héllo, wörld\n"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    generated = hf.generate(torch.tensor([list(b"def ")]), max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10)


def test_byte_gpt_mapping_needs_every_tensor_it_knows():
    state = init_state("byte-gpt", BYTE, seed=0)
    config, mapped = byte_gpt_to_gpt2(BYTE, state)
    assert config["n_positions"] == 32 and config["activation_function"] == "gelu"
    assert mapped["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: [in, out]
    with pytest.raises(ValueError, match="unexpected tensor blocks.0.attn.extra"):
        byte_gpt_to_gpt2(BYTE, {**state, "blocks.0.attn.extra": torch.zeros(1)})


def test_byte_tokenizer_json_is_deterministic_and_maps_each_byte_to_itself():
    from tokenizers import Tokenizer

    data = byte_tokenizer_json()
    assert data == byte_tokenizer_json()
    tok = Tokenizer.from_str(data.decode())
    raw = bytes(range(256)).decode("latin-1")
    assert tok.encode(raw).ids == list(raw.encode("utf-8"))
    assert tok.get_vocab_size() == 256


def test_llama_with_bpe_exports_loads_generates_and_reimports(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diloco.tokenization import load_tokenizer, train_bpe

    tokenizer_json = train_bpe(TEXTS, 300)
    vocab = load_tokenizer(tokenizer_json).vocab_size
    state = init_state("llama", LLAMA, seed=2, vocab_size=vocab)
    out = export_hf_directory(tmp_path / "llama", arch="llama", config=LLAMA, state=state,
                              tokenizer_json=tokenizer_json, model_card="card", vocab_size=vocab)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def add(a, b):")["input_ids"]
    assert ids == load_tokenizer(tokenizer_json).encode("def add(a, b):")
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, _ours("llama", LLAMA, state, vocab)(x), atol=1e-5)
    new = hf.generate(x, max_new_tokens=5, do_sample=True, top_k=10)
    assert new.shape[1] > x.shape[1]
    assert isinstance(tok.decode(new[0]), str)
    arch, config, again = load_hf_directory(out)
    assert arch == "llama" and config["vocab_size"] == vocab and config["num_key_value_heads"] == 2
    assert all(torch.equal(again[k], state[k]) for k in state) and again.keys() == state.keys()


def test_export_refuses_weights_that_do_not_fit(tmp_path):
    state = init_state("llama", LLAMA, seed=0)
    with pytest.raises(ValueError, match="missing"):
        export_hf_directory(tmp_path, arch="llama", config=LLAMA, state={k: v for k, v in state.items()
                                                                          if k != "lm_head.weight"},
                            tokenizer_json=None, model_card="")
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        export_hf_directory(tmp_path, arch="llama", config={**LLAMA, "vocab_size": 128},
                            state=init_state("llama", {**LLAMA, "vocab_size": 128}, seed=0), tokenizer_json=None,
                            model_card="")
