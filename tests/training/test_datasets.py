"""Prepared datasets: a BPE run on JSONL is filtered, tokenized and sharded once on the server, the ledger says
what each guardrail removed, and agents fetch their shard and the tokenizer by sha256 with a worker token."""

import hashlib
import json

import pytest
import torch

from diloco.data import read_token_shard, shard_filtered_tokens
from diloco.tokenization import load_tokenizer
from governance.specs import spec_normalise
from ledger.models import Entry
from tests.governance.factories import GuardrailFactory, ProposalFactory
from tests.training.conftest import client_for
from tests.training.factories import tiny_spec
from training import blobs, services
from training.models import DatasetBlob, PreparedDataset, TrainingRun
from training.services import datasets

pytestmark = pytest.mark.django_db

LLAMA = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "max_position_embeddings": 64}
WORDS = ["alpha", "beta", "gamma", "delta", "river", "mountain", "forest", "signal", "token", "shard"]


def corpus() -> list[dict]:
    rows = []
    for i in range(48):
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40 + i))
        if i % 8 == 3:
            text += " the secret plan"
        if i % 12 == 5:
            text += " spam spam spam"
        rows.append({"id": i, "text": text})
    return rows


@pytest.fixture
def data_root(settings, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus()))
    settings.AGORA_DATA_ROOT = root
    settings.VAR_DIR = tmp_path / "var"
    datasets.clear_caches()
    yield root
    datasets.clear_caches()


def bpe_proposal(root, **dataset):
    from governance.models import Proposal

    spec = tiny_spec(model={"name": "tiny-llama", "arch": "llama", "config": dict(LLAMA)})
    spec["dataset"] = {"source": f"file:{root}/corpus.jsonl", "format": "jsonl", "field": "text",
                       "heldout_fraction": 0.25, **dataset}
    spec["tokenizer"] = {"kind": "bpe", "vocab_size": 400}
    spec = spec_normalise(kind="training", spec=spec)
    return ProposalFactory(kind=Proposal.Kind.TRAINING, status=Proposal.Status.APPROVED, spec=spec)


def test_a_bpe_run_on_jsonl_is_prepared_once_with_guardrail_counts_in_the_ledger(data_root):
    secrets = GuardrailFactory(kind="data_filter", patterns=[r"\bsecret\b"], title="No secrets")
    spam = GuardrailFactory(kind="data_filter", patterns=["spam"], title="No spam")
    GuardrailFactory(kind="output_filter", patterns=["spam"], title="Output only")  # not a data filter
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)

    assert run.status == TrainingRun.Status.RUNNING and run.rounds.count() == 1
    prepared = PreparedDataset.objects.get(run=run)
    docs = [r["text"] for r in corpus()]
    removed = {g["title"]: g["removed_train"] + g["removed_heldout"] for g in prepared.guardrails}
    assert removed == {"No secrets": sum("secret" in d for d in docs),
                       "No spam": sum("spam" in d and "secret" not in d for d in docs)}
    assert prepared.documents["loaded"] == 48
    assert prepared.documents["kept_train"] + prepared.documents["kept_heldout"] == 48 - sum(removed.values())
    assert prepared.raw_sha256 == hashlib.sha256((data_root / "corpus.jsonl").read_bytes()).hexdigest()

    entry = Entry.objects.get(action="dataset.prepared", subject=f"run:{run.pk}")
    assert entry.payload["raw_sha256"] == prepared.raw_sha256 and entry.payload["format"] == "jsonl"
    assert [g["id"] for g in entry.payload["guardrails"]] == [secrets.pk, spam.pk]
    assert entry.payload["shards"] == [s["sha256"] for s in prepared.shards] and len(prepared.shards) == 2
    assert entry.payload["tokenizer"]["sha256"] == prepared.tokenizer_sha256

    tokenizer = datasets.prepared_tokenizer(prepared)
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size <= 400
    texts = []
    for info in [*prepared.shards, prepared.heldout]:
        shard = datasets.prepared_shard(info["sha256"])
        assert shard.tokenizer == prepared.tokenizer_sha256 and shard.documents == info["documents"]
        texts += [tokenizer.decode(shard.document(i).tolist()) for i in range(shard.documents)]
    assert sorted(texts) == sorted(d for d in docs if "secret" not in d and "spam" not in d)
    assert torch.equal(datasets.run_heldout_tokens(run), datasets.prepared_shard(prepared.heldout["sha256"]).tokens)


def test_the_tokenizer_is_trained_on_the_training_split_only(data_root):
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    prepared = run.prepared_dataset
    from diloco.data import load_documents, split_documents
    from diloco.tokenization import train_bpe

    docs = load_documents(f"file:{data_root}/corpus.jsonl", policy=blobs.dataset_policy(),
                          format="jsonl", field="text")
    train, heldout = split_documents(docs, 0.25)
    assert hashlib.sha256(train_bpe(train, 400)).hexdigest() == prepared.tokenizer_sha256
    assert hashlib.sha256(train_bpe(docs, 400)).hexdigest() != prepared.tokenizer_sha256


def test_the_task_names_its_shard_and_tokenizer_and_the_worker_downloads_them(data_root, cpu_worker, other_member):
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    prepared = run.prepared_dataset
    api = client_for(cpu_worker)
    task = api.post("/api/v1/tasks/claim").json()
    shard_info = prepared.shards[task["dataset"]["shard_index"]]
    assert task["dataset"]["format"] == "jsonl" and task["dataset"]["shard_sha256"] == shard_info["sha256"]
    assert task["tokenizer"]["kind"] == "bpe" and task["tokenizer"]["sha256"] == prepared.tokenizer_sha256
    assert task["tokenizer"]["vocab_size"] == prepared.vocab_size

    response = api.get(f"/api/v1/shards/{shard_info['sha256']}")
    assert response.status_code == 200
    assert response["Cache-Control"].endswith("immutable") and response["ETag"] == f'"{shard_info["sha256"]}"'
    data = b"".join(response.streaming_content)
    assert hashlib.sha256(data).hexdigest() == shard_info["sha256"]
    tok_response = api.get(task["tokenizer"]["url"])
    tok_bytes = b"".join(tok_response.streaming_content)
    tokenizer = load_tokenizer(tok_bytes)
    assert tokenizer.sha256 == prepared.tokenizer_sha256
    shard = read_token_shard(data, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.sha256)
    assert shard.documents == shard_info["documents"]
    assert api.get(f"/api/v1/shards/{shard_info['sha256']}", HTTP_IF_NONE_MATCH=response["ETag"]).status_code == 304


@pytest.mark.parametrize("who", ["anonymous", "member", "bad token"])
def test_only_workers_may_download_shards_and_tokenizers(data_root, who, member_client, api_client):
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    prepared = run.prepared_dataset
    client = {"anonymous": api_client, "member": member_client}.get(who)
    if client is None:
        client = api_client
        client.credentials(HTTP_AUTHORIZATION="Bearer not-a-token")
    assert client.get(f"/api/v1/shards/{prepared.shards[0]['sha256']}").status_code in (401, 403)
    assert client.get(f"/api/v1/tokenizers/{prepared.tokenizer_sha256}").status_code in (401, 403)


def test_unknown_or_mistyped_blobs_are_404(data_root, cpu_worker):
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    prepared = run.prepared_dataset
    api = client_for(cpu_worker)
    assert api.get(f"/api/v1/shards/{'0' * 64}").status_code == 404
    assert api.get(f"/api/v1/shards/{prepared.tokenizer_sha256}").status_code == 404  # a tokenizer is no shard
    assert api.get("/api/v1/tokenizers/not-a-hash").status_code == 404


def test_a_corrupted_shard_is_never_served(data_root, cpu_worker, checkpoint_storage):
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    blob = DatasetBlob.objects.get(sha256=run.prepared_dataset.shards[0]["sha256"])
    (checkpoint_storage / blob.storage_name).write_bytes(b"tampered")
    response = client_for(cpu_worker).get(f"/api/v1/shards/{blob.sha256}")
    assert response.status_code == 409 and response.json()["error"] == "shard_corrupt"


def test_a_dataset_that_cannot_be_prepared_fails_the_run_with_the_reason(data_root):
    (data_root / "corpus.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    assert run.status == TrainingRun.Status.FAILED
    assert "line 2: no field 'text'" in run.reason
    assert run.rounds.count() == 0 and not PreparedDataset.objects.exists()
    assert Entry.objects.get(action="run.failed", subject=f"run:{run.pk}").payload["reason"] == run.reason


def test_a_guardrail_enacted_mid_run_still_filters_the_shards_the_server_scores_on(data_root):
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    prepared = run.prepared_dataset
    tokenizer = datasets.prepared_tokenizer(prepared)
    late = [{"id": 99, "kind": "data_filter", "patterns": ["mountain"]}]
    tokens = datasets.run_shard_tokens(run, prepared, 0, late)
    assert "mountain" not in tokenizer.decode(tokens.tolist())
    shard = datasets.prepared_shard(prepared.shards[0]["sha256"])
    assert torch.equal(tokens, shard_filtered_tokens(shard, tokenizer, late)[0])


def test_schema_documents_the_download_endpoints(api_client):
    schema = api_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    for path in ("/api/v1/shards/{sha256}", "/api/v1/tokenizers/{sha256}"):
        assert "get" in schema["paths"][path]
        assert "200" in schema["paths"][path]["get"]["responses"]


def test_the_run_detail_reports_held_out_bits_per_byte(data_root, api_client):
    from training.models import Round

    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    heldout = run.prepared_dataset.heldout
    Round.objects.filter(run=run, index=1).update(eval_loss_before=2.0)
    point = api_client.get(f"/api/v1/runs/{run.pk}/").json()["losses"][0]
    assert point["heldout"] == 2.0
    assert point["heldout_bpb"] == pytest.approx(2.0 * heldout["tokens"] / heldout["bytes"] / 0.6931471805599453)


def test_a_byte_level_run_on_a_file_reaches_agents_as_shards_of_todays_bytes(data_root):
    from diloco.data import encode_documents, load_documents, shard_documents, split_documents
    from governance.models import Proposal

    (data_root / "notes.txt").write_text("\n\n".join(f"note {i}: " + "words " * (i + 3) for i in range(20)))
    spec = spec_normalise(kind="training", spec={**tiny_spec(), "dataset": {
        "source": f"file:{data_root}/notes.txt", "heldout_fraction": 0.2}})
    run = services.run_start(proposal_id=ProposalFactory(
        kind=Proposal.Kind.TRAINING, status=Proposal.Status.APPROVED, spec=spec).pk)
    prepared = run.prepared_dataset
    assert prepared.tokenizer_kind == "byte" and prepared.tokenizer_sha256 == "" and prepared.vocab_size == 256
    docs = load_documents(f"file:{data_root}/notes.txt", policy=blobs.dataset_policy())
    train, heldout = split_documents(docs, 0.2)
    for index in range(2):
        shard = datasets.prepared_shard(prepared.shards[index]["sha256"])
        assert torch.equal(shard.tokens, encode_documents(shard_documents(train, index, 2)))
    assert torch.equal(datasets.run_heldout_tokens(run), encode_documents(heldout))


def test_a_byte_level_run_on_the_builtin_corpus_keeps_protocol_v1(db):
    from tests.training.factories import approved_proposal

    run = services.run_start(proposal_id=approved_proposal().pk)
    assert datasets.run_dataset(run) is None


def test_the_run_detail_shows_the_prepared_dataset(data_root, api_client):
    GuardrailFactory(kind="data_filter", patterns=[r"\bsecret\b"], title="No secrets")
    run = services.run_start(proposal_id=bpe_proposal(data_root).pk)
    body = api_client.get(f"/api/v1/runs/{run.pk}/").json()
    assert body["dataset"]["format"] == "jsonl" and body["dataset"]["tokenizer_sha256"] == run.prepared_dataset.tokenizer_sha256
    assert body["dataset"]["guardrails"][0]["title"] == "No secrets"
    assert body["dataset"]["guardrails"][0]["removed_train"] + body["dataset"]["guardrails"][0]["removed_heldout"] == 6
    from tests.training.factories import approved_proposal

    plain = services.run_start(proposal_id=approved_proposal().pk)
    assert api_client.get(f"/api/v1/runs/{plain.pk}/").json()["dataset"] is None
