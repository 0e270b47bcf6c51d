import pytest
import torch

from diloco.checkpoint import CheckpointError, load_weights, save_weights, sha256_hex
from diloco.data import encode_documents, load_documents
from diloco.evaluate import bf16_is_fast, eval_dtype, evaluate_loss
from diloco.models import build_model, init_state, model_with_weights


def test_checkpoint_round_trip(tiny_config):
    state = init_state("byte-gpt", tiny_config, seed=1)
    meta = {"arch": "byte-gpt", "config": tiny_config, "round": 3}
    data = save_weights(state, meta)
    assert data == save_weights(state, meta)  # deterministic bytes, stable hash
    assert len(sha256_hex(data)) == 64
    loaded, got_meta = load_weights(data)
    assert got_meta == meta
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    model = build_model(got_meta["arch"], got_meta["config"])
    model.load_state_dict(loaded)


def test_checkpoint_rejects_garbage():
    with pytest.raises(CheckpointError):
        load_weights(b"not a checkpoint at all")


def test_evaluate_loss_deterministic_and_seeded(tiny_config):
    tokens = encode_documents(load_documents("builtin:python-docs")[:3])
    model = build_model("byte-gpt", tiny_config)
    a = evaluate_loss(model, tokens, batch_size=4, seq_len=32, batches=3)
    b = evaluate_loss(model, tokens, batch_size=4, seq_len=32, batches=3)
    c = evaluate_loss(model, tokens, batch_size=4, seq_len=32, batches=3, seed=1)
    assert a == b
    assert a != c
    assert model.training  # mode restored
    with pytest.raises(ValueError):
        evaluate_loss(model, tokens[:10], batch_size=1, seq_len=32)


def test_bf16_evaluation_is_close_to_fp32_and_deterministic(tiny_config):
    tokens = encode_documents(load_documents("builtin:python-docs")[:3])
    model = build_model("byte-gpt", tiny_config, seed=2)
    fp32 = evaluate_loss(model, tokens, batch_size=4, seq_len=32, batches=3)
    bf16 = evaluate_loss(model, tokens, batch_size=4, seq_len=32, batches=3, autocast_dtype=torch.bfloat16)
    again = evaluate_loss(model, tokens, batch_size=4, seq_len=32, batches=3, autocast_dtype=torch.bfloat16)
    assert bf16 == again
    assert abs(bf16 - fp32) / fp32 < 5e-3  # far inside the 10% tolerance the coordinator applies


def test_eval_dtype_choices():
    assert eval_dtype("fp32", "cpu") is None
    assert eval_dtype("bf16", "cpu") is torch.bfloat16
    assert eval_dtype("auto", "cpu") is (torch.bfloat16 if bf16_is_fast("cpu") else None)
    with pytest.raises(ValueError, match="evaluation precision must be one of auto, fp32, bf16"):
        eval_dtype("fp8", "cpu")


def test_model_with_weights_shares_the_tensors_and_matches_build_model(tiny_config):
    state = init_state("byte-gpt", tiny_config, seed=4)
    built = build_model("byte-gpt", tiny_config)
    built.load_state_dict(state)
    shared = model_with_weights("byte-gpt", tiny_config, state)
    assert shared.get_parameter("wte.weight").data_ptr() == state["wte.weight"].data_ptr()  # not copied
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(shared(x), built(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        model_with_weights("byte-gpt", tiny_config, {k: v for k, v in state.items() if k != "wte.weight"})
    with pytest.raises(ValueError, match="unknown model arch"):
        model_with_weights("transformer-xl", tiny_config, state)


def test_checkpoint_bytes_depend_only_on_the_tensors_and_meta(tiny_config):
    """An agent that rebuilds the weights from a published step writes the server's exact bytes: neither the
    dict's order, nor a tensor's memory layout, nor the meta's key order changes them."""
    state = init_state("byte-gpt", tiny_config, seed=1)
    meta = {"arch": "byte-gpt", "config": tiny_config, "round": 3}
    data = save_weights(state, meta)
    reordered = {k: state[k] for k in reversed(list(state))}
    strided = {k: (v.t().contiguous().t() if v.dim() == 2 else v.clone()) for k, v in state.items()}
    assert any(not v.is_contiguous() for v in strided.values())
    assert save_weights(reordered, meta) == data
    assert save_weights(strided, dict(reversed(list(meta.items())))) == data
    changed = dict(state)
    name = next(iter(changed))
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] = torch.nextafter(changed[name].view(-1)[0], torch.tensor(1.0))
    assert sha256_hex(save_weights(changed, meta)) != sha256_hex(data)  # one ulp anywhere changes the hash
