"""The training proposal form proposes Llama and GPT-2 runs, not only byte-gpt: the architecture, its config
keys, the tokenizer and LoRA, with the API's bounds and messages on the input that caused them."""

import html as html_lib
import re

import pytest

from governance.models import Proposal

pytestmark = pytest.mark.django_db

BASE = {"kind": "training", "title": "Train a Llama", "body": "Why not.", "open_now": "on",
        "model_name": "docs-llama", "model_init": "scratch", "dataset_source": "builtin:python-docs",
        "heldout_fraction": "0.1", "rounds": "3", "allow_cpu": "on"}
LLAMA = {"arch": "llama", "hidden_size": "32", "intermediate_size": "96", "num_hidden_layers": "1",
         "num_attention_heads": "4", "num_key_value_heads": "2", "max_position_embeddings": "128",
         "tokenizer_kind": "bpe", "tokenizer_vocab_size": "512", "vocab_size": "512"}


def _errors_of(html: str, field: str) -> list[str]:
    match = re.search(rf'<ul class="errorlist" id="id_{field}-errors">(.*?)</ul>', html, re.S)
    return [html_lib.unescape(m) for m in re.findall(r"<li>(.*?)</li>", match.group(1))] if match else []


def test_the_form_offers_every_architecture_and_the_llama_inputs(logged_in):
    html = logged_in.get("/proposals/new/?kind=training").content.decode()
    for arch in ("byte-gpt", "llama", "gpt2"):
        assert f'<option value="{arch}"' in html, arch
    for name in ("hidden_size", "num_key_value_heads", "max_position_embeddings", "n_positions", "vocab_size",
                 "tokenizer_kind", "tokenizer_vocab_size", "lora_rank"):
        assert f'name="{name}"' in html, name
    assert ">Shape: Llama<" in html


def test_a_member_proposes_a_llama_with_a_bpe_tokenizer_from_the_form(logged_in):
    # The byte-gpt inputs keep their pre-filled values; a Llama run must not carry them.
    response = logged_in.post("/proposals/new/", {**BASE, **LLAMA, "n_layer": "2", "n_embd": "64", "n_head": "4",
                                                  "block_size": "64", "seq_len": "64"})
    proposal = Proposal.objects.get()
    assert response.status_code == 302 and proposal.status == "active"
    model = proposal.spec["model"]
    assert model["arch"] == "llama" and model["lora"] is None
    config = model["config"]
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "max_position_embeddings", "vocab_size")} == {
        "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 512}
    assert not {"n_layer", "n_embd", "n_head", "block_size"} & set(config)
    assert proposal.spec["tokenizer"] == {"kind": "bpe", "vocab_size": 512}


def test_the_form_and_the_api_freeze_the_same_llama_spec(logged_in, member_client):
    logged_in.post("/proposals/new/", {**BASE, **LLAMA, "seq_len": "64"})
    spec = {"model": {"name": "docs-llama", "init": "scratch", "arch": "llama", "config": {
        "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 512}},
        "tokenizer": {"kind": "bpe", "vocab_size": 512},
        "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
        "diloco": {"rounds": 3, "seq_len": 64}, "hardware": {"allow_cpu": True}}
    api = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Same", "spec": spec},
                             format="json")
    assert api.status_code == 201, api.content
    form_proposal, api_proposal = Proposal.objects.order_by("pk")
    assert form_proposal.spec == api_proposal.spec
    assert form_proposal.content_hash == api_proposal.content_hash


def test_a_gpt2_reads_the_shared_shape_inputs_and_its_own_context(logged_in):
    response = logged_in.post("/proposals/new/", {**BASE, "arch": "gpt2", "n_layer": "3", "n_embd": "48",
                                                  "n_head": "4", "block_size": "64", "n_positions": "96",
                                                  "seq_len": "64", "hidden_size": "32"})
    assert response.status_code == 302
    config = Proposal.objects.get().spec["model"]["config"]
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_positions"]) == (3, 48, 4, 96)
    assert "block_size" not in config and "hidden_size" not in config


@pytest.mark.parametrize(("field", "value"), [
    ("hidden_size", "4"),  # under the model zoo's lower bound
    ("hidden_size", "wide"),  # not a number
    ("num_key_value_heads", "3"),  # does not divide the 4 attention heads
    ("max_position_embeddings", "32"),  # shorter than the sequence length
])
def test_a_bad_llama_value_is_refused_on_its_input_with_the_api_message(logged_in, member_client, field, value):
    form = logged_in.post("/proposals/new/", {**BASE, **LLAMA, "seq_len": "64", field: value})
    assert form.status_code == 400
    messages = _errors_of(form.content.decode(), field if field != "max_position_embeddings" else "seq_len")
    assert messages, form.content.decode()
    config = {k: int(v) if v.isdigit() else v for k, v in LLAMA.items()
              if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings", "vocab_size")}
    config[field] = int(value) if value.isdigit() else value
    api = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Bad", "spec": {
        "model": {"arch": "llama", "init": "scratch", "config": config},
        "tokenizer": {"kind": "bpe", "vocab_size": 512}, "diloco": {"seq_len": 64}}}, format="json")
    assert api.status_code == 400
    api_messages = [m for msgs in api.json()["fields"].values() for m in msgs]
    assert messages == api_messages
    assert field.split("_")[0] in messages[0] or "seq_len" in messages[0] or "max_position_embeddings" in messages[0]
    assert not Proposal.objects.exists()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_named(logged_in):
    form = logged_in.post("/proposals/new/", {**BASE, **LLAMA, "seq_len": "64", "vocab_size": "300"})
    assert form.status_code == 400
    assert _errors_of(form.content.decode(), "tokenizer_vocab_size") == [
        "The model's config has vocab_size 300, fewer than the tokenizer's 512 ids."]


def test_lora_from_the_form(logged_in):
    scratch = logged_in.post("/proposals/new/", {**BASE, **LLAMA, "seq_len": "64", "lora_rank": "4"})
    assert scratch.status_code == 400
    assert "scratch" in " ".join(_errors_of(scratch.content.decode(), "lora_rank"))
    alone = logged_in.post("/proposals/new/", {**BASE, **LLAMA, "seq_len": "64", "lora_alpha": "8"})
    assert alone.status_code == 400 and _errors_of(alone.content.decode(), "lora_alpha")
    assert not Proposal.objects.exists()
    ok = logged_in.post("/proposals/new/", {**BASE, **LLAMA, "seq_len": "64", "model_init": "latest",
                                            "lora_rank": "4", "lora_alpha": "8"})
    assert ok.status_code == 302
    lora = Proposal.objects.get().spec["model"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])


def test_editing_a_llama_draft_shows_its_config(logged_in):
    logged_in.post("/proposals/new/", {**BASE, **LLAMA, "seq_len": "64", "open_now": ""})
    proposal = Proposal.objects.get()
    assert proposal.status == "draft"
    html = logged_in.get(f"/proposals/{proposal.pk}/edit").content.decode()
    assert re.search(r'<option value="llama"\s+selected', html)
    assert re.search(r'name="num_key_value_heads" value="2"', html)
    response = logged_in.post(f"/proposals/{proposal.pk}/edit", {**BASE, **LLAMA, "seq_len": "64",
                                                                  "open_now": "", "hidden_size": "64"})
    assert response.status_code == 302
    proposal.refresh_from_db()
    assert proposal.spec["model"]["config"]["hidden_size"] == 64 and proposal.spec["model"]["arch"] == "llama"
