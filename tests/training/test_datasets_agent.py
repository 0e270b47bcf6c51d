"""The agent side of prepared datasets: it downloads only its shard and the tokenizer (verified, cached by
sha256), filters with the guardrails in force, and trains on token ids an upload the server accepts."""

import httpx
import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client as DjangoClient

from tests.governance.factories import GuardrailFactory
from tests.training.conftest import client_for
from tests.training.factories import approved_proposal, metrics_json
from tests.training.test_datasets import bpe_proposal, data_root  # noqa: F401 (fixture)
from training import services
from training.services import datasets
from workers.client import Client
from workers.runner import TaskError, TaskRunner

pytestmark = pytest.mark.django_db


class Hooks:
    def check(self) -> None:
        pass

    def on_step(self, step, steps, loss) -> None:
        pass


class Recording(httpx.BaseTransport):
    """The Django app of this test (its test client, so the test's database stays open), recording the paths
    the agent asked for."""

    def __init__(self):
        self.paths: list[str] = []

    def handle_request(self, request):
        self.paths.append(request.url.path)
        headers = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "content-type")}
        response = DjangoClient().generic(request.method, request.url.raw_path.decode(), data=request.read(),
                                          content_type=request.headers.get("content-type", ""), **headers)
        body = b"".join(response.streaming_content) if response.streaming else response.content
        return httpx.Response(response.status_code, headers=dict(response.items()), content=body)


@pytest.fixture
def prepared_task(data_root, cpu_worker):  # noqa: F811
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    task = client_for(cpu_worker).post("/api/v1/tasks/claim").json()
    return run, task


def agent(cpu_worker, tmp_path, transport=None):
    client = Client("http://testserver", cpu_worker.plain_token, transport=transport or Recording())
    return TaskRunner(client=client, cache_dir=tmp_path / "cache")


def test_the_agent_fetches_only_its_shard_and_the_tokenizer_then_trains_on_token_ids(prepared_task, cpu_worker,
                                                                                       tmp_path):
    run, task = prepared_task
    runner = agent(cpu_worker, tmp_path)
    output = runner.run(task, Hooks())
    prepared = run.prepared_dataset
    mine = prepared.shards[task["dataset"]["shard_index"]]["sha256"]
    assert sorted(runner.client._http._transport.paths) == sorted(
        [f"/api/v1/shards/{mine}", f"/api/v1/tokenizers/{prepared.tokenizer_sha256}",
         f"/api/v1/checkpoints/{task['checkpoint_sha256']}"])
    assert output.details["shard_sha256"] == mine and output.details["tokenizer"] == prepared.tokenizer_sha256
    assert output.metrics["steps"] == task["inner"]["steps"]
    response = client_for(cpu_worker).post(f"/api/v1/tasks/{task['id']}/result", {
        "update": SimpleUploadedFile("u.safetensors", output.update), "metrics": metrics_json()}, format="multipart")
    assert response.status_code == 202, response.content


def test_tokens_match_the_servers_and_follow_guardrails_enacted_later(prepared_task, cpu_worker, tmp_path):
    run, task = prepared_task
    runner = agent(cpu_worker, tmp_path)
    prepared = run.prepared_dataset
    tokens, info = runner.load_tokens(task)
    assert torch.equal(tokens, datasets.run_shard_tokens(run, prepared, task["dataset"]["shard_index"], []))
    assert info["dropped_by_guardrails"] == 0

    late = GuardrailFactory(kind="data_filter", patterns=["river"], title="No rivers").as_policy()
    filtered, info = runner.load_tokens({**task, "guardrails": [late]})
    assert info["dropped_by_guardrails"] > 0 and filtered.numel() < tokens.numel()
    assert "river" not in datasets.prepared_tokenizer(prepared).decode(filtered.tolist())


def test_shard_and_tokenizer_come_from_the_cache_and_a_corrupt_copy_is_fetched_again(prepared_task, cpu_worker,
                                                                                       tmp_path):
    _run, task = prepared_task
    first = agent(cpu_worker, tmp_path)
    tokens, _ = first.load_tokens(task)
    second = agent(cpu_worker, tmp_path)
    assert torch.equal(second.load_tokens(task)[0], tokens)
    assert second.client._http._transport.paths == []
    cached = tmp_path / "cache" / "data" / "shards" / task["dataset"]["shard_sha256"]
    cached.write_bytes(b"bit rot")
    assert torch.equal(second.load_tokens(task)[0], tokens)
    assert second.client._http._transport.paths == [f"/api/v1/shards/{task['dataset']['shard_sha256']}"]


def test_a_shard_that_does_not_match_its_sha256_fails_the_task(prepared_task, cpu_worker, tmp_path):
    _run, task = prepared_task
    other = "f" * 64
    bad = {**task, "dataset": {**task["dataset"], "shard_sha256": other, "shard_url": None}}
    with pytest.raises(TaskError, match="HTTP 404"):
        agent(cpu_worker, tmp_path).load_tokens(bad)

    def lying(request):
        return httpx.Response(200, content=b"not the shard")

    with pytest.raises(TaskError, match="arrived with sha256"):
        agent(cpu_worker, tmp_path, transport=httpx.MockTransport(lying)).load_tokens(task)


def test_an_old_byte_level_task_still_reads_its_source(cpu_worker, tmp_path):
    services.run_start(proposal_id=approved_proposal().pk)
    task = client_for(cpu_worker).post("/api/v1/tasks/claim").json()
    assert "shard_sha256" not in task["dataset"] and "tokenizer" not in task
    tokens, info = agent(cpu_worker, tmp_path).load_tokens(task)
    assert tokens.numel() > 1000 and int(tokens.max()) < 256


def test_a_prepared_round_is_aggregated_scored_evaluated_and_published(prepared_task, cpu_worker,
                                                                                 gpu_worker, tmp_path):
    from training.models import Round, Task

    run, first = prepared_task
    second = client_for(gpu_worker).post("/api/v1/tasks/claim").json()
    for worker, task in ((cpu_worker, first), (gpu_worker, second)):
        output = agent(worker, tmp_path / str(worker.pk)).run(task, Hooks())
        response = client_for(worker).post(f"/api/v1/tasks/{task['id']}/result", {
            "update": SimpleUploadedFile("u.safetensors", output.update), "metrics": metrics_json()},
            format="multipart")
        assert response.status_code == 202
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run, index=1).pk)
    assert rnd is not None and rnd.eval_loss_before is not None and rnd.eval_loss_after is not None
    assert rnd.eval_loss_before < 7.0  # ln(512) ≈ 6.24 at chance: the held-out shard's ids are the model's
    assert all(t.score is not None for t in Task.objects.filter(round=rnd))
    # The accepted round's version names the run's tokenizer and loads with the model's vocabulary (the
    # config's, which holds every id of a BPE that learned fewer than it was asked for).
    from training.models import ModelVersion
    from training.services.versions import version_module

    assert rnd.accepted
    version = ModelVersion.objects.get(run=run)
    assert version.tokenizer_sha256 == run.prepared_dataset.tokenizer_sha256
    assert version.config["vocab_size"] == run.spec["model"]["config"]["vocab_size"] >= run.prepared_dataset.vocab_size
    assert version_module(version).get_input_embeddings().weight.shape[0] == version.config["vocab_size"]

