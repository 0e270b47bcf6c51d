"""Two simulated workers, three outer rounds, the whole pipeline a real run goes through."""

import torch

from diloco.aggregate import aggregate, screen_updates
from diloco.checkpoint import load_weights, save_weights
from diloco.codecs import decode_update, encode_update, reference_of
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.evaluate import evaluate_loss
from diloco.guardrails import filter_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state
from diloco.outer import OuterOptimizer


def test_two_workers_three_rounds_heldout_loss_falls(tiny_config):
    guardrails = [{"id": 1, "title": "t", "kind": "data_filter", "patterns": ["^zzz-never$"], "description": ""}]
    train, heldout = split_documents(load_documents("builtin:python-docs"), 0.1)
    train, _ = filter_documents(train, guardrails)
    shards = [encode_documents(shard_documents(train, i, 2)) for i in range(2)]
    heldout_tokens = encode_documents(heldout)
    cfg = InnerConfig(steps=15, lr=3e-3, batch_size=8, seq_len=32, warmup=3)
    arch = "byte-gpt"
    params = init_state(arch, tiny_config, seed=0)
    outer = OuterOptimizer(params, lr=0.7, momentum=0.9)
    ref = reference_of(params)
    worker_state = [None, None]

    def heldout_loss(state):
        model = build_model(arch, tiny_config)
        model.load_state_dict(state)
        return evaluate_loss(model, heldout_tokens, batch_size=8, seq_len=32, batches=4)

    losses = [heldout_loss(params)]
    checkpoint = save_weights(params, {"arch": arch, "config": tiny_config})
    for rnd in range(3):
        uploads = []
        for w in range(2):
            weights, meta = load_weights(checkpoint)
            model = build_model(meta["arch"], meta["config"])
            model.load_state_dict(weights)
            result = inner_train(model, shards[w], cfg, seed=1000 * rnd + w, optimizer_state=worker_state[w])
            worker_state[w] = result.optimizer_state
            uploads.append(encode_update(result.pseudo_gradient, "int8"))
        updates = [decode_update(u, ref) for u in uploads]
        assert all(s.accepted for s in screen_updates(updates))
        params = outer.step(aggregate(updates, "trimmed_mean"))
        checkpoint = save_weights(params, {"arch": arch, "config": tiny_config, "round": rnd + 1})
        losses.append(heldout_loss(params))
    assert losses[-1] < losses[0] - 1.0, losses
    assert losses[3] < losses[1], losses
    assert all(torch.isfinite(v).all() for v in params.values())
