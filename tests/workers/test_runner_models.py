"""The runner trains any architecture a task names: Hugging Face llama from a checkpoint, and LoRA adapters
over a frozen base where the update covers the adapters only."""

from __future__ import annotations

import math

import pytest

from tests.workers.conftest import make_task
from workers.client import Client
from workers.runner import TaskError, TaskRunner

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32}
LORA = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


class Hooks:
    def __init__(self):
        self.steps = []

    def check(self) -> None:
        pass

    def on_step(self, step: int, steps: int, loss: float) -> None:
        self.steps.append(step)


def _serve(fake_server, state: dict, meta: dict) -> str:
    from diloco.checkpoint import save_weights, sha256_hex

    data = save_weights(state, meta)
    sha = sha256_hex(data)
    fake_server.on("GET", f"/api/v1/checkpoints/{sha}", (200, data))
    return sha


@pytest.fixture
def runner(fake_server, tmp_path):
    client = Client(fake_server.url, "wkr_secret")
    yield TaskRunner(client=client, cache_dir=tmp_path / "cache")
    client.close()


@pytest.fixture(scope="module")
def llama_state():
    from diloco.models import init_state

    return init_state("llama", LLAMA, seed=3)


def test_llama_task_trains_every_weight(runner, fake_server, llama_state):
    from diloco.codecs import decode_update, reference_of

    sha = _serve(fake_server, llama_state, {"arch": "llama", "config": LLAMA})
    task = make_task(checkpoint_sha256=sha, steps=2, compression="fp32",
                     model={"arch": "llama", "config": LLAMA, "vocab_size": 256})
    out = runner.run(task, Hooks())
    delta = decode_update(out.update, reference_of(llama_state))
    assert set(delta) == set(llama_state)
    assert "model.layers.0.self_attn.q_proj.weight" in delta and delta["lm_head.weight"].abs().sum() > 0
    assert out.metrics["tokens"] == 2 * 2 * 16 and out.metrics["tokens_per_s"] > 0
    assert math.isfinite(out.metrics["loss_end"])


def test_lora_task_uploads_only_the_adapters(runner, fake_server, llama_state):
    from diloco.codecs import decode_update, reference_of
    from diloco.lora import LoraSpec, init_adapter_state

    spec = LoraSpec.from_dict(LORA)
    adapters = init_adapter_state("llama", LLAMA, spec, seed=1)
    base_sha = _serve(fake_server, llama_state, {"arch": "llama", "config": LLAMA})
    adapter_sha = _serve(fake_server, adapters, {"lora": LORA})
    task = make_task(checkpoint_sha256=adapter_sha, steps=2, compression="fp32",
                     model={"arch": "llama", "config": LLAMA, "lora": LORA, "lora_base_sha256": base_sha})
    out = runner.run(task, Hooks())
    delta = decode_update(out.update, reference_of(adapters))
    assert set(delta) == set(adapters)
    assert len(delta) == 4 and all(".lora_A." in k or ".lora_B." in k for k in delta)
    assert any(delta[k].abs().sum() > 0 for k in delta if ".lora_B." in k)
    # The upload is a small fraction of a full update of the same model.
    assert out.details["update_bytes"] * 10 < sum(t.numel() * 4 for t in llama_state.values())


def test_lora_task_without_its_base_fails_naming_it(runner, fake_server, llama_state):
    from diloco.lora import LoraSpec, init_adapter_state

    adapter_sha = _serve(fake_server, init_adapter_state("llama", LLAMA, LoraSpec.from_dict(LORA), seed=1), {})
    task = make_task(checkpoint_sha256=adapter_sha, model={"arch": "llama", "config": LLAMA, "lora": LORA})
    with pytest.raises(TaskError, match="model.lora_base_sha256"):
        runner.run(task, Hooks())


@pytest.mark.parametrize(("model", "message"), [
    ({"arch": "llama", "config": {**LLAMA, "hidden_size": 30}}, "hidden_size"),
    ({"arch": "mamba", "config": {}}, "unknown model arch"),
    ({"arch": "llama", "config": LLAMA, "lora": {"rank": 0}}, "lora rank"),
    ({"arch": "llama", "config": LLAMA, "vocab_size": "many"}, "malformed"),
])
def test_a_model_the_agent_cannot_build_fails_the_task(runner, model, message):
    with pytest.raises(TaskError, match=message):
        runner.run(make_task(model=model), Hooks())


def test_checkpoint_of_another_shape_fails_the_task(runner, fake_server, llama_state):
    sha = _serve(fake_server, llama_state, {})
    task = make_task(checkpoint_sha256=sha, model={"arch": "llama", "config": {**LLAMA, "intermediate_size": 96}})
    with pytest.raises(TaskError, match="does not fit"):
        runner.run(task, Hooks())


def test_token_ids_beyond_the_vocabulary_fail_the_task(runner, fake_server):
    from diloco.models import init_state

    small = {**LLAMA, "vocab_size": 64}  # bytes of English text reach past 64
    sha = _serve(fake_server, init_state("llama", small, seed=0), {})
    with pytest.raises(TaskError, match="vocabulary of 64"):
        runner.run(make_task(checkpoint_sha256=sha, model={"arch": "llama", "config": small}), Hooks())


def test_train_throughput_times_the_agent_inner_loop_and_counts_model_flops():
    from workers.bench import LLAMA_125M, model_flops_per_token, train_throughput

    # 12 layers of (4 attention + 3 MLP) matrices at width 768 / 2048, two norms each, final norm, head.
    layer = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768
    matmul_params = 12 * layer + 768 + 768 * 32_000
    assert model_flops_per_token("llama", LLAMA_125M, 1024) == 6 * matmul_params + 12 * 12 * 768 * 1024
    result = train_throughput("llama-tiny", device="cpu", batch_size=2, seq_len=16, steps=3, warmup_steps=1)
    assert result["steady_tokens_per_s"] > 0 and result["task_tokens_per_s"] > 0
    assert result["bf16_autocast"] is False and result["fused_adamw"] is False and result["mfu"] is None
