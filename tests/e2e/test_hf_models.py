"""Hugging Face models end to end: real agents train a Llama-config model with a BPE tokenizer trained on the
run's JSONL data, and the exported version loads with ``AutoModelForCausalLM.from_pretrained`` and generates."""

from __future__ import annotations

import io
import json
import tarfile
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from tests.procs import BIN, Proc, celery_worker, enroll_agent, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 320}


def llama_spec(source: str) -> dict:
    return {
        "model": {"name": "e2e-llama", "arch": "llama", "init": "scratch", "config": LLAMA},
        "dataset": {"source": source, "format": "jsonl", "field": "text", "heldout_fraction": 0.1},
        "tokenizer": {"kind": "bpe", "vocab_size": 320},
        "diloco": {"rounds": 2, "workers_per_round": 2, "min_workers": 2, "inner_steps": 12, "inner_lr": 0.004,
                   "batch_size": 8, "seq_len": 64, "warmup": 2, "compression": "int8", "aggregator": "mean",
                   "round_timeout_s": 120},
        "hardware": {"min_vram_mb": 0, "allow_cpu": True},
    }


def write_jsonl_corpus(path, *, max_bytes: int = 150_000) -> None:
    """Python's documentation topics as JSON lines ({"text": ...}), the first ``max_bytes`` of them."""
    from pydoc_data.topics import topics

    lines, size = [], 0
    for name in sorted(topics):
        line = json.dumps({"title": name, "text": topics[name]})
        lines.append(line)
        size += len(line)
        if size > max_bytes:
            break
    path.write_text("\n".join(lines) + "\n")


def approve(settings, spec: dict, title: str):
    from governance.errors import VotingClosed
    from governance.services import proposal_approve, proposal_close, proposal_submit, vote_cast
    from tests.factories import UserFactory

    settings.AGORA_VOTING_PERIOD = timedelta(seconds=6)
    settings.AGORA_QUORUM = 3
    author, staff = UserFactory(), UserFactory(is_staff=True)
    proposal = proposal_submit(author=author, kind="training", title=title, body="e2e", spec=spec, open_now=True)
    for voter in (author, UserFactory(), UserFactory()):
        try:
            vote_cast(proposal=proposal, voter=voter, choice="yes")
        except VotingClosed:  # closed early once the outcome was settled, or by the beat on a busy machine
            break
    proposal.refresh_from_db()
    time.sleep(max(0.0, (proposal.closes_at - timezone.now()).total_seconds()) + 0.2)
    proposal = proposal_close(proposal_id=proposal.pk)
    assert proposal.status == "succeeded", proposal.status
    return proposal_approve(proposal=proposal, by=staff)


def agents_env(process_env, settings, data_root) -> dict:
    settings.AGORA_HEARTBEAT_INTERVAL_S = 1
    settings.AGORA_DATA_ROOT = data_root
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "heartbeat": "10000/min", "enroll": "1000/min"}}
    return {**process_env, "AGORA_TRAINING_TICK_S": "1", "AGORA_CLOSE_EVERY_S": "2", "AGORA_SWEEP_EVERY_S": "5",
            "AGORA_HEARTBEAT_INTERVAL_S": "1", "AGORA_DATA_ROOT": str(data_root)}


def start_agents(env, tmp_path, server: str, names) -> list[Proc]:
    procs = []
    for name in names:
        agent_env, _ = enroll_agent(env, tmp_path, name, server)
        procs.append(Proc([str(BIN / "agora-worker"), "run", "--allow-cpu"], agent_env, tmp_path / f"{name}.log"))
    return procs


def wait_finished(run, procs, timeout: float = 600):
    from training.models import TrainingRun

    def finished():
        run.refresh_from_db()
        assert run.status not in ("failed", "canceled"), run.reason
        return run.status == TrainingRun.Status.FINISHED

    wait_for(finished, timeout, interval=1, what=f"run {run.pk} to finish", procs=procs)


def test_agents_train_a_llama_with_a_bpe_tokenizer_on_jsonl_and_the_export_loads(process_env, live_server,
                                                                                   settings, tmp_path):
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ledger.selectors import ledger_verify
    from training.models import ModelVersion, Round, TrainingRun

    data_root = tmp_path / "data"
    data_root.mkdir()
    write_jsonl_corpus(data_root / "docs.jsonl")
    env = agents_env(process_env, settings, data_root)
    procs: list[Proc] = []
    try:
        procs.append(celery_worker(env, tmp_path / "celery.log", beat=True))
        proposal = approve(settings, llama_spec(f"file:{data_root / 'docs.jsonl'}"), "A tiny Llama on the docs")
        run = wait_for(lambda: TrainingRun.objects.filter(proposal=proposal).first(), 120,
                       what="the run to be created", procs=procs)
        procs += start_agents(env, tmp_path, live_server.url, ("llama-1", "llama-2"))
        wait_finished(run, procs)

        rounds = list(Round.objects.filter(run=run).order_by("index"))
        kept = [r for r in rounds if r.eval_loss_after is not None]
        assert kept and kept[-1].eval_loss_after < rounds[0].eval_loss_before, [
            (r.index, r.status, r.eval_loss_before, r.eval_loss_after, r.reason) for r in rounds]
        versions = list(ModelVersion.objects.filter(run=run).order_by("number"))
        assert [v.round.index for v in versions] == [r.index for r in rounds if r.accepted]
        latest = versions[-1]
        assert latest.arch == "llama" and len(latest.tokenizer_sha256) == 64
        assert latest.tokenizer_sha256 == run.prepared_dataset.tokenizer_sha256

        response = httpx.get(f"{live_server.url}/models/e2e-llama/v{latest.number}.tar.gz", timeout=120)
        assert response.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            tar.extractall(tmp_path / "export", filter="data")
        folder = tmp_path / "export" / f"e2e-llama-v{latest.number}"
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("The for statement", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
        assert out.shape[1] > ids.shape[1]
        text = tokenizer.decode(out[0, ids.shape[1]:])
        print(f"\nexported v{latest.number} continues 'The for statement' with {text!r}")
        card = (folder / "README.md").read_text()
        assert f"#{proposal.pk}" in card and proposal.content_hash in card and "docs.jsonl" in card
        assert "llama-1" in card or "llama-2" in card
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
        verdict = ledger_verify()
        assert verdict.ok, verdict
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_an_imported_model_is_fine_tuned_with_lora_by_agents_sending_only_adapter_updates(process_env, live_server,
                                                                                          settings, tmp_path):
    import statistics

    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from diloco.codecs import encode_update
    from ledger.selectors import ledger_verify
    from tests.training.test_import_export import save_tiny_llama
    from training import services
    from training.models import ModelVersion, Round, Task, TrainingRun

    env = agents_env(process_env, settings, tmp_path / "data")
    original = save_tiny_llama(tmp_path / "data" / "tiny-llama")
    base = services.model_import(directory=tmp_path / "data" / "tiny-llama", slug="tiny-llama")
    workers = 2
    spec = {
        "model": {"name": "tiny-llama", "arch": "llama", "init": "latest", "config": base.config,
                  "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
        "tokenizer": {"kind": "model"},
        "diloco": {"rounds": 2, "workers_per_round": workers, "min_workers": workers, "inner_steps": 10,
                   "inner_lr": 0.01, "batch_size": 8, "seq_len": 64, "warmup": 0, "compression": "int8",
                   "aggregator": "mean", "round_timeout_s": 120},
        "hardware": {"min_vram_mb": 0, "allow_cpu": True},
    }
    procs: list[Proc] = []
    try:
        procs.append(celery_worker(env, tmp_path / "celery.log", beat=True))
        proposal = approve(settings, spec, "LoRA on the imported tiny Llama")
        run = wait_for(lambda: TrainingRun.objects.filter(proposal=proposal).first(), 120,
                       what="the run to be created", procs=procs)
        assert run.base_version == base
        procs += start_agents(env, tmp_path, live_server.url, ("lora-1", "lora-2"))
        wait_finished(run, procs)

        rounds = list(Round.objects.filter(run=run).order_by("index"))
        accepted = [r for r in rounds if r.accepted]
        assert accepted, [(r.index, r.status, r.reason) for r in rounds]
        sizes = list(Task.objects.filter(round__run=run, update_size__isnull=False).values_list("update_size",
                                                                                                flat=True))
        lora_update = statistics.median(sizes)
        full_state = {k: torch.randn(v.shape) for k, v in original.state_dict().items()}
        full_update = len(encode_update(full_state, "int8"))
        print(f"\n{'':24}{'bytes/update':>14}{'bytes/round':>14}  ({workers} workers, int8)"
              f"\n{'LoRA r=4 q_proj,v_proj':24}{lora_update:>14,.0f}{lora_update * workers:>14,.0f}"
              f"\n{'full fine-tuning':24}{full_update:>14,}{full_update * workers:>14,}"
              f"\nLoRA sends {full_update / lora_update:.1f}x fewer bytes per update")
        assert lora_update * 10 < full_update

        versions = list(ModelVersion.objects.filter(run=run).order_by("number"))
        assert versions and all(v.lora and v.lora_base == base for v in versions)
        latest = versions[-1]
        response = httpx.get(f"{live_server.url}/models/tiny-llama/v{latest.number}.tar.gz", timeout=120)
        assert response.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            tar.extractall(tmp_path / "export", filter="data")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / f"tiny-llama-v{latest.number}").eval()
        idx = torch.tensor([[5, 17, 42, 7, 99]])
        with torch.no_grad():
            assert not torch.allclose(merged(idx).logits, original(idx).logits, atol=1e-6)  # the adapters merged in
            assert merged.generate(idx, max_new_tokens=4, do_sample=False).shape[1] == 9
        assert ledger_verify().ok
    finally:
        for proc in reversed(procs):
            proc.stop()
