import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.data import encode_documents, load_documents
from diloco.evaluate import evaluate_loss
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model

CORPUS = encode_documents(["the quick brown fox jumps over the lazy dog. " * 20])


def _cfg(**kw):
    base = dict(steps=30, lr=3e-3, batch_size=8, seq_len=32, warmup=3)
    base.update(kw)
    return InnerConfig(**base)


def test_reduces_loss_and_returns_exact_pseudo_gradient(tiny_config):
    model = build_model("byte-gpt", tiny_config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = evaluate_loss(model, CORPUS, batch_size=4, seq_len=32)
    seen = []
    result = inner_train(model, CORPUS, _cfg(), seed=0, progress=lambda s, loss: seen.append((s, loss)))
    after = evaluate_loss(model, CORPUS, batch_size=4, seq_len=32)
    end = model.state_dict()
    assert after < before - 1.0
    assert result.loss_end < result.loss_start
    assert [s for s, _ in seen] == list(range(1, 31))
    assert result.steps == 30 and result.tokens == 30 * 8 * 32 and result.seconds > 0
    assert result.pseudo_gradient.keys() == start.keys()
    for k in start:
        delta = result.pseudo_gradient[k]
        assert delta.dtype == torch.float32
        assert torch.equal(delta, start[k] - end[k])  # exactly θ_start − θ_end
        assert torch.allclose(start[k] - delta, end[k], rtol=0, atol=1e-6)
    assert any(result.pseudo_gradient[k].abs().sum() > 0 for k in start)


def test_deterministic_given_seed(tiny_config):
    runs = []
    for seed in (5, 5, 6):
        model = build_model("byte-gpt", tiny_config)
        runs.append(inner_train(model, CORPUS, _cfg(steps=5), seed=seed).pseudo_gradient)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_dropout_runs_deterministically(tiny_config):
    cfg = {**tiny_config, "dropout": 0.1}
    a = inner_train(build_model("byte-gpt", cfg), CORPUS, _cfg(steps=3), seed=1).pseudo_gradient
    b = inner_train(build_model("byte-gpt", cfg), CORPUS, _cfg(steps=3), seed=1).pseudo_gradient
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_state_round_trip_continues_exactly(tiny_config):
    """Two rounds of 4 steps with the state carried over equal the same rounds done in one process."""
    cfg = _cfg(steps=4, warmup=6)
    model_a = build_model("byte-gpt", tiny_config)
    first = inner_train(model_a, CORPUS, cfg, seed=1)
    state = first.optimizer_state
    assert {k.rsplit(".", 1)[1] for k in state} == {"exp_avg", "exp_avg_sq", "step"}
    assert float(state["wte.weight.step"]) == 4
    # Through safetensors bytes, as a worker would keep it on disk.
    restored = st_load(st_save(state))
    second_a = inner_train(model_a, CORPUS, cfg, seed=2, optimizer_state=restored)
    assert float(second_a.optimizer_state["wte.weight.step"]) == 8

    model_b = build_model("byte-gpt", tiny_config)
    inner_train(model_b, CORPUS, cfg, seed=1)
    second_b = inner_train(model_b, CORPUS, cfg, seed=2, optimizer_state=dict(state))
    assert all(torch.equal(second_a.pseudo_gradient[k], second_b.pseudo_gradient[k]) for k in state if k in second_a.pseudo_gradient)
    assert all(torch.equal(model_a.state_dict()[k], model_b.state_dict()[k]) for k in model_a.state_dict())

    # The state handed back is the caller's to keep: training that continues from it (here twice, as the
    # agent's next round and its training ahead both do) never changes it.
    kept = {k: v.clone() for k, v in state.items()}
    assert all(torch.equal(state[k], kept[k]) for k in state)
    inner_train(build_model("byte-gpt", tiny_config), CORPUS, cfg, seed=3, optimizer_state=state)
    assert all(torch.equal(state[k], kept[k]) for k in state)

    # Without the state, the second round differs (fresh moments, warmup again).
    model_c = build_model("byte-gpt", tiny_config)
    inner_train(model_c, CORPUS, cfg, seed=1)
    second_c = inner_train(model_c, CORPUS, cfg, seed=2)
    assert any(not torch.equal(second_a.pseudo_gradient[k], second_c.pseudo_gradient[k]) for k in second_c.pseudo_gradient)


def test_bad_optimizer_state_rejected(tiny_config):
    model = build_model("byte-gpt", tiny_config)
    with pytest.raises(ValueError, match="unknown entries"):
        inner_train(model, CORPUS, _cfg(steps=1), seed=0, optimizer_state={"nope.exp_avg": torch.zeros(1)})
    bad = {"wte.weight.exp_avg": torch.zeros(3), "wte.weight.exp_avg_sq": torch.zeros(3), "wte.weight.step": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="shape"):
        inner_train(model, CORPUS, _cfg(steps=1), seed=0, optimizer_state=bad)


def test_gradient_clipping_is_applied(tiny_config):
    """Adam's first step is ~lr per coordinate whatever the gradient scale, unless the clipped gradient
    becomes comparable to Adam's eps (1e-8): a tiny clip norm visibly shrinks the step."""

    def first_step_size(clip):
        model = build_model("byte-gpt", tiny_config)
        r = inner_train(model, CORPUS, _cfg(steps=1, lr=1e-3, warmup=0, weight_decay=0.0, grad_clip=clip), seed=0)
        return max(v.abs().max().item() for v in r.pseudo_gradient.values())

    unclipped = first_step_size(0.0)
    assert unclipped == pytest.approx(1e-3, rel=0.01)
    assert first_step_size(1e-9) < 0.2 * unclipped


def test_warmup_scales_first_step(tiny_config):
    def first_step_size(warmup):
        model = build_model("byte-gpt", tiny_config)
        r = inner_train(model, CORPUS, _cfg(steps=1, warmup=warmup, weight_decay=0.0), seed=0)
        return max(v.abs().max().item() for v in r.pseudo_gradient.values())

    assert first_step_size(10) == pytest.approx(first_step_size(0) / 10, rel=1e-3)


def test_config_validation():
    with pytest.raises(ValueError):
        InnerConfig(steps=0, lr=1e-3, batch_size=1, seq_len=1)
    with pytest.raises(ValueError):
        InnerConfig(steps=1, lr=0, batch_size=1, seq_len=1)


def test_python_docs_corpus_trains(tiny_config):
    tokens = encode_documents(load_documents("builtin:python-docs")[:5])
    model = build_model("byte-gpt", tiny_config)
    result = inner_train(model, tokens, _cfg(steps=10), seed=0)
    assert result.loss_end < result.loss_start


LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hugging_face_models_train_through_the_same_loop(arch):
    config = LLAMA if arch == "llama" else {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32}
    model = build_model(arch, config, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = inner_train(model, CORPUS, _cfg(steps=20, lr=1e-2), seed=0)
    assert result.loss_end < result.loss_start - 0.5
    assert result.pseudo_gradient.keys() == start.keys()
    assert all(torch.equal(result.pseudo_gradient[k], start[k] - model.state_dict()[k]) for k in start)
    assert result.tokens == 20 * 8 * 32 and result.tokens_per_s > 0


def test_lora_trains_only_the_adapters_and_the_pseudo_gradient_covers_them():
    from diloco.lora import LoraSpec, apply_lora, trainable_state

    base = build_model("llama", LLAMA, seed=0)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraSpec(rank=2, alpha=4, target_modules=("q_proj", "v_proj")), seed=1)
    adapters = {k: v.clone() for k, v in trainable_state(model).items()}
    result = inner_train(model, CORPUS, _cfg(steps=10, lr=1e-2), seed=0)
    assert result.pseudo_gradient.keys() == adapters.keys()
    assert all(".lora_A." in k or ".lora_B." in k for k in adapters)
    after = trainable_state(model)
    assert all(torch.equal(result.pseudo_gradient[k], adapters[k] - after[k]) for k in adapters)
    assert result.loss_end < result.loss_start
    base_after = model.get_base_model().state_dict()
    for name, value in frozen.items():  # the frozen weights never move (peft wraps them as base_layer)
        key = name if name in base_after else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base_after[key], value), name
    assert {k.rsplit(".", 1)[0] for k in result.optimizer_state} <= {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_cpu_trains_in_fp32_with_the_reference_adamw(monkeypatch, tiny_config):
    """The CUDA branches (bf16 autocast, fused AdamW) stay off on the CPU; on a CUDA device they switch on."""
    from diloco import inner

    assert inner.autocast_dtype("cpu") is None and not inner.fused_adamw_available("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inner.autocast_dtype("cuda") is torch.bfloat16 and inner.fused_adamw_available("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inner.autocast_dtype("cuda") is None
    model = build_model("byte-gpt", tiny_config)
    opt = inner.make_optimizer(model, _cfg(), fused=False)
    assert not opt.defaults.get("fused")


def test_token_ids_in_a_narrow_dtype_train_like_int64(tiny_config):
    """Pre-tokenized shards keep ids as uint8/uint16/int32; training on them is training on the same ids."""
    wide = inner_train(build_model("byte-gpt", tiny_config), CORPUS, _cfg(steps=3), seed=2).pseudo_gradient
    for dtype in (torch.uint8, torch.int32):
        narrow = inner_train(build_model("byte-gpt", tiny_config), CORPUS.to(dtype), _cfg(steps=3), seed=2)
        assert all(torch.equal(wide[k], narrow.pseudo_gradient[k]) for k in wide)
    assert evaluate_loss(build_model("byte-gpt", tiny_config), CORPUS.to(torch.int32), batch_size=2,
                         seq_len=16) == evaluate_loss(build_model("byte-gpt", tiny_config), CORPUS, batch_size=2,
                                                      seq_len=16)


def test_fused_adamw_path_trains_and_resumes_its_state(monkeypatch, tiny_config):
    """The CUDA branch's fused AdamW, run on the CPU (torch has a fused CPU kernel): same training as the
    reference kernel up to rounding, and a saved state resumes into it."""
    from diloco import inner

    reference = inner_train(build_model("byte-gpt", tiny_config), CORPUS, _cfg(steps=4), seed=3)
    monkeypatch.setattr(inner, "fused_adamw_available", lambda device: True)
    fused_model = build_model("byte-gpt", tiny_config)
    fused = inner_train(fused_model, CORPUS, _cfg(steps=4), seed=3)
    assert all(torch.allclose(fused.pseudo_gradient[k], reference.pseudo_gradient[k], atol=1e-5)
               for k in reference.pseudo_gradient)
    again = inner_train(fused_model, CORPUS, _cfg(steps=2), seed=4, optimizer_state=fused.optimizer_state)
    assert float(again.optimizer_state["wte.weight.step"]) == 6
