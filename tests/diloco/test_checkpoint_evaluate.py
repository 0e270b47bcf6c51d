import pytest
import torch

from diloco.checkpoint import CheckpointError, load_weights, save_weights, sha256_hex
from diloco.data import encode_documents, load_documents
from diloco.evaluate import evaluate_loss
from diloco.models import build_model, init_state


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
