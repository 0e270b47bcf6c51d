"""Spec validation through the API: defaults, normalisation, and bad fields named with nothing stored."""

import pytest

from governance.models import Proposal
from governance.specs import content_hash, spec_normalise
from ledger.models import Entry

pytestmark = pytest.mark.django_db
URL = "/api/v1/proposals/"


def test_defaults_are_filled_and_the_hash_covers_the_frozen_spec(member_client):
    response = member_client.post(URL, {"kind": "training", "title": "Small run", "spec": {
        "model": {"name": " Byte-GPT-Small "}, "diloco": {"rounds": 5}}}, format="json")
    assert response.status_code == 201, response.json()
    spec = response.json()["spec"]
    assert spec["model"]["name"] == "byte-gpt-small"  # normalised
    assert spec["diloco"]["rounds"] == 5 and spec["diloco"]["inner_lr"] == 0.0004  # default filled in
    assert spec["hardware"] == {"min_vram_mb": 0, "allow_cpu": True}
    proposal = Proposal.objects.get()
    assert proposal.content_hash == content_hash(spec) == response.json()["content_hash"]
    assert len(proposal.content_hash) == 64
    assert proposal.status == Proposal.Status.ACTIVE  # "open" defaults to true


def test_normalising_twice_changes_nothing(settings, tmp_path):
    settings.AGORA_DATA_ROOT = tmp_path
    (tmp_path / "c.txt").write_text("a corpus")
    once = spec_normalise(kind="training", spec={"dataset": {"source": f"file:{tmp_path}//corpus/../c.txt"}})
    assert once["dataset"]["source"] == f"file:{tmp_path}/c.txt"
    assert spec_normalise(kind="training", spec=once) == once


HTTPS = {"source": "https://example.org/corpus.txt"}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"diloco": {"inner_lr": "fast"}}, "spec.diloco.inner_lr"),
        ({"diloco": {"inner_lr": 0}}, "spec.diloco.inner_lr"),
        ({"diloco": {"inner_lr": 5}}, "spec.diloco.inner_lr"),
        ({"diloco": {"rounds": 0}}, "spec.diloco.rounds"),
        ({"diloco": {"rounds": 2.5}}, "spec.diloco.rounds"),
        ({"diloco": {"min_workers": 3, "workers_per_round": 2}}, "spec.diloco.min_workers"),
        ({"diloco": {"warmup": 50, "inner_steps": 10}}, "spec.diloco.warmup"),
        ({"diloco": {"compression": "zip"}}, "spec.diloco.compression"),
        ({"diloco": {"compression": "topk2", "aggregator": "trimmed_mean"}}, "spec.diloco.aggregator"),
        ({"diloco": {"compression": "topk2", "outer_lr": 4.5}}, "spec.diloco.outer_lr"),
        ({"diloco": {"compression": "topk4", "aggregator": "median"}}, "spec.diloco.aggregator"),
        ({"diloco": {"compression": "topk2", "aggregator": "mean", "density": 0.5}}, "spec.diloco.density"),
        ({"diloco": {"compression": "topk2", "aggregator": "mean", "density": 0}}, "spec.diloco.density"),
        ({"diloco": {"aggregator": "max"}}, "spec.diloco.aggregator"),
        ({"diloco": {"seq_len": 128}}, "spec.diloco.seq_len"),  # > block_size 64
        ({"diloco": {"inner_Lr": 0.1}}, "spec.diloco.inner_Lr"),  # typo: unknown field
        ({"model": {"config": {"n_embd": 66, "n_head": 4}}}, "spec.model.config.n_embd"),
        ({"model": {"name": "no spaces please"}}, "spec.model.name"),
        ({"model": {"arch": "mamba"}}, "spec.model.arch"),
        ({"model": {"init": "random"}}, "spec.model.init"),
        ({"dataset": HTTPS}, "spec.dataset.sha256"),
        ({"dataset": {**HTTPS, "sha256": "abc"}}, "spec.dataset.sha256"),
        ({"dataset": {"source": "http://example.org/x"}}, "spec.dataset.source"),
        ({"dataset": {"source": "file:relative.txt"}}, "spec.dataset.source"),
        ({"dataset": {"heldout_fraction": 0.9}}, "spec.dataset.heldout_fraction"),
        ({"hardware": {"min_vram_mb": -1}}, "spec.hardware.min_vram_mb"),
        ({"diloco": "fast"}, "spec.diloco"),
    ],
)
def test_bad_training_field_is_named_and_nothing_is_stored(member_client, spec, field):
    response = member_client.post(URL, {"kind": "training", "title": "Bad run", "spec": spec}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid"
    assert field in body["fields"], body
    assert body["detail"].startswith(f"{field}: ")
    assert not Proposal.objects.exists() and not Entry.objects.exists()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "data_filter", "patterns": ["ok", "(unclosed"]}, "spec.patterns.1"),
        ({"kind": "data_filter", "patterns": []}, "spec.patterns"),
        ({"kind": "data_filter", "patterns": ["x" * 201]}, "spec.patterns.0"),
        ({"kind": "data_filter", "patterns": [f"p{i}" for i in range(51)]}, "spec.patterns"),
        ({"kind": "banana", "patterns": ["x"]}, "spec.kind"),
        ({"patterns": ["x"]}, "spec.kind"),
        ({"action": "retire"}, "spec.guardrail_id"),
        ({"action": "retire", "guardrail_id": 12345}, "spec.guardrail_id"),
        ({"action": "retire", "guardrail_id": 1, "patterns": ["x"]}, "spec.patterns"),
    ],
)
def test_bad_guardrail_field_is_named_and_nothing_is_stored(member_client, spec, field):
    response = member_client.post(URL, {"kind": "guardrail", "title": "Bad rule", "spec": spec}, format="json")
    assert response.status_code == 400
    assert field in response.json()["fields"], response.json()
    assert not Proposal.objects.exists() and not Entry.objects.exists()


def test_several_bad_fields_are_all_reported(member_client):
    response = member_client.post(URL, {"kind": "training", "title": "x", "spec": {
        "diloco": {"inner_lr": -1, "batch_size": 0}, "hardware": {"allow_cpu": "perhaps"}}}, format="json")
    assert response.status_code == 400
    fields = response.json()["fields"]
    assert {"title", "spec.diloco.inner_lr", "spec.diloco.batch_size", "spec.hardware.allow_cpu"} <= set(fields)


def test_a_sparse_compression_takes_a_density_and_a_sparse_friendly_aggregator():
    diloco = spec_normalise(kind="training", spec={"diloco": {"compression": "topk2",
                                                              "aggregator": "norm_clipped_mean"}})["diloco"]
    assert diloco["compression"] == "topk2" and diloco["density"] == 0.02
    assert spec_normalise(kind="training", spec={})["diloco"]["compression"] == "int8"


@pytest.mark.parametrize("codec", ["topk2", "topk4"])
def test_a_sparse_run_gets_the_sparse_defaults_for_what_it_leaves_out(codec):
    """Asking only for a sparse codec gives the settings measured for it (outer lr 2, error-feedback β 0.95,
    a norm-clipped mean), not the dense defaults that left such a run far behind in bench.fidelity_sparse."""
    diloco = spec_normalise(kind="training", spec={"diloco": {"compression": codec}})["diloco"]
    assert (diloco["outer_lr"], diloco["outer_momentum"], diloco["aggregator"]) == (2.0, 0.95, "norm_clipped_mean")
    small = spec_normalise(kind="training", spec={"diloco": {"compression": codec, "workers_per_round": 2,
                                                             "min_workers": 1}})["diloco"]
    assert small["aggregator"] == "mean"  # a norm-clipped mean needs three updates to resist one
    dense = spec_normalise(kind="training", spec={"diloco": {"compression": "int8"}})["diloco"]
    assert (dense["outer_lr"], dense["outer_momentum"], dense["aggregator"]) == (0.7, 0.9, "trimmed_mean")


def test_what_a_sparse_proposal_sets_itself_is_kept():
    diloco = spec_normalise(kind="training", spec={"diloco": {
        "compression": "topk2", "outer_lr": 0.7, "outer_momentum": 0.9, "aggregator": "mean"}})["diloco"]
    assert (diloco["outer_lr"], diloco["outer_momentum"], diloco["aggregator"]) == (0.7, 0.9, "mean")
    # a stored spec normalised again is unchanged
    again = spec_normalise(kind="training", spec={"diloco": diloco})["diloco"]
    assert again == diloco


@pytest.mark.parametrize("codec", ["topk2", "topk4"])
def test_a_sparse_run_takes_chunks_of_4096_unless_it_says_otherwise(codec):
    """The sparse default: the top 2% of every 4096 values (32768 did no better at the same share in
    bench.fidelity_sparse)."""
    sparse = spec_normalise(kind="training", spec={"diloco": {"compression": codec}})["diloco"]
    assert sparse["sparse_chunk"] == 4096
    chosen = spec_normalise(kind="training", spec={"diloco": {"compression": codec, "sparse_chunk": 32768}})["diloco"]
    assert chosen["sparse_chunk"] == 32768  # what the proposal sets is kept
    assert spec_normalise(kind="training", spec={"diloco": chosen})["diloco"] == chosen  # and stays on re-saving
    # A dense run does not use it and keeps the field's default (or what it was given).
    assert spec_normalise(kind="training", spec={})["diloco"]["sparse_chunk"] == 4096
    dense = spec_normalise(kind="training", spec={"diloco": {"compression": "int8", "sparse_chunk": 1024}})
    assert dense["diloco"]["sparse_chunk"] == 1024


def test_the_sparse_chunks_are_the_ones_the_codecs_decode():
    from diloco import codecs
    from governance import specs

    assert specs.SPARSE_CHUNKS == codecs.SPARSE_CHUNKS  # a copy: governance may not import diloco


@pytest.mark.parametrize("chunk", [5000, 32, 65536, 0, -4096, 4096.5, True, "big", None, [4096]])
def test_a_chunk_no_decoder_takes_is_refused_naming_the_field(member_client, chunk):
    response = member_client.post(URL, {"kind": "training", "title": "Odd chunks", "spec": {
        "diloco": {"compression": "topk2", "sparse_chunk": chunk}}}, format="json")
    assert response.status_code == 400
    fields = response.json()["fields"]
    assert set(fields) == {"spec.diloco.sparse_chunk"}, fields
    if isinstance(chunk, int) and not isinstance(chunk, bool):  # a number: the message lists the sizes
        assert "64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768" in fields["spec.diloco.sparse_chunk"][0]
    assert not Proposal.objects.exists() and not Entry.objects.exists()


@pytest.mark.parametrize(("given", "frozen"), [("latest", "latest"), ("current", "current"), ("scratch", "scratch"),
                                               (3, 3), ("3", 3), ("v2", 2)])
def test_init_is_scratch_latest_or_a_version_number(given, frozen):
    assert spec_normalise(kind="training", spec={"model": {"init": given}})["model"]["init"] == frozen


def test_init_defaults_to_the_latest_version_and_full_fine_tuning():
    model = spec_normalise(kind="training", spec={})["model"]
    assert model["init"] == "latest" and model["lora"] is None and model["arch"] == "byte-gpt"


@pytest.mark.parametrize("bad", [0, -1, True, "v", 2.5, "newest"])
def test_a_bad_init_is_named(bad):
    with pytest.raises(Exception) as info:
        spec_normalise(kind="training", spec={"model": {"init": bad}})
    assert "init" in info.value.detail["spec"]["model"]


def test_lora_gets_the_default_target_modules_and_needs_an_existing_version():
    spec = spec_normalise(kind="training", spec={"model": {"lora": {"rank": 4}}})
    assert spec["model"]["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.0, "target_modules": ["c_attn"]}
    with pytest.raises(Exception) as info:
        spec_normalise(kind="training", spec={"model": {"init": "scratch", "lora": {"rank": 4}}})
    assert "lora" in info.value.detail["spec"]["model"]
    with pytest.raises(Exception) as info:
        spec_normalise(kind="training", spec={"model": {"lora": {"rank": 0}}})
    assert "rank" in info.value.detail["spec"]["model"]["lora"]


def test_the_parameter_cap_refuses_a_model_too_large_with_its_count(member_client, settings):
    settings.AGORA_MAX_MODEL_PARAMS = 100_000
    response = member_client.post(URL, {"kind": "training", "title": "Too big", "spec": {
        "model": {"config": {"n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 64}}}}, format="json")
    assert response.status_code == 400
    message = response.json()["fields"]["spec.model.config"][0]
    assert "100,000" in message and "AGORA_MAX_MODEL_PARAMS" in message
    assert not Proposal.objects.exists()
    settings.AGORA_MAX_MODEL_PARAMS = 10_000_000
    assert spec_normalise(kind="training", spec={"model": {"config": {"n_layer": 4, "n_embd": 128, "n_head": 4}}})


LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 300}


def test_a_llama_config_is_completed_by_the_model_zoo_and_bounds_the_sequence_length():
    spec = spec_normalise(kind="training", spec={"model": {"arch": "llama", "config": LLAMA, "init": "scratch"},
                                                 "diloco": {"seq_len": 64}})
    config = spec["model"]["config"]
    assert {k: config[k] for k in LLAMA} == LLAMA and config["head_dim"] == 8  # defaults filled in
    assert spec_normalise(kind="training", spec=spec) == spec


@pytest.mark.parametrize(("model", "diloco", "field"), [
    ({"arch": "llama", "config": {**LLAMA, "hidden_size": 30}}, {}, "spec.model.config.hidden_size"),
    ({"arch": "llama", "config": {**LLAMA, "num_key_value_heads": 3}}, {}, "spec.model.config.num_key_value_heads"),
    ({"arch": "llama", "config": {**LLAMA, "hiden_size": 32}}, {}, "spec.model.config.hiden_size"),
    ({"arch": "llama", "config": {**LLAMA, "max_position_embeddings": 32}}, {"seq_len": 64}, "spec.diloco.seq_len"),
    ({"arch": "gpt2", "config": {"n_embd": 30, "n_head": 4}}, {}, "spec.model.config.n_embd"),
    ({"arch": "gpt2", "config": {"n_positions": 32}}, {"seq_len": 64}, "spec.diloco.seq_len"),
])
def test_a_bad_hugging_face_config_is_named(member_client, model, diloco, field):
    response = member_client.post(URL, {"kind": "training", "title": "Bad", "spec": {
        "model": model, "diloco": diloco}}, format="json")
    assert response.status_code == 400
    assert field in response.json()["fields"], response.json()
    assert not Proposal.objects.exists()


def test_the_parameter_cap_counts_a_llama_with_its_vocabulary(settings):
    settings.AGORA_MAX_MODEL_PARAMS = 20_000
    with pytest.raises(Exception) as info:
        spec_normalise(kind="training", spec={"model": {"arch": "llama", "config": LLAMA}})
    assert "AGORA_MAX_MODEL_PARAMS" in str(info.value.detail["spec"]["model"]["config"])
