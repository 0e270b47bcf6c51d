"""Editing a training draft in the browser keeps what the member wrote through the API that the form has no
input for (a Llama's rope_theta, LoRA dropout, …), lists it under the form, drops it only when the member
ticks it off or switches to an architecture that does not read it, and says so."""

from __future__ import annotations

import html as htmllib
import re

import pytest

from governance.models import Proposal, ProposalRevision

pytestmark = pytest.mark.django_db

LLAMA_SPEC = {
    "model": {"name": "docs-llama", "init": "latest", "arch": "llama", "config": {
        "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 512,
        "rope_theta": 500000.0, "hidden_act": "gelu"},
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj"]}},
    "tokenizer": {"kind": "bpe", "vocab_size": 512},
    "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
    "diloco": {"rounds": 3, "seq_len": 64},
    "hardware": {"allow_cpu": True},
}
KEPT = ['model.config.hidden_act = "gelu"', "model.config.rope_theta = 500000.0", "model.lora.dropout = 0.1",
        'model.lora.target_modules = ["q_proj", "k_proj", "v_proj"]']


@pytest.fixture
def draft(member_client, client, member):
    response = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "A long-context Llama",
                                                         "spec": LLAMA_SPEC, "open": False},
                                  format="json")
    assert response.status_code == 201, response.content
    proposal = Proposal.objects.get()
    assert proposal.status == "draft"
    client.force_login(member)
    return proposal


def as_posted(form_html: str) -> dict:
    """What a browser posts back for the form as shown: unticked checkboxes send nothing."""
    data: dict = {}
    for tag in re.findall(r"<input[^>]*>", form_html):
        name = re.search(r'name="([^"]+)"', tag)
        if not name or name.group(1) == "csrfmiddlewaretoken":
            continue
        value = re.search(r'value="([^"]*)"', tag)
        if 'type="checkbox"' in tag:
            if " checked" in tag:
                data.setdefault(name.group(1), []).append(htmllib.unescape(value.group(1)) if value else "on")
        else:
            data.setdefault(name.group(1), htmllib.unescape(value.group(1)) if value else "")
    for name, body in re.findall(r'<select name="([^"]+)"[^>]*>(.*?)</select>', form_html, flags=re.S):
        chosen = re.search(r'<option value="([^"]*)"[^>]*selected', body)
        if chosen:
            data[name] = chosen.group(1)
    for name, body in re.findall(r'<textarea name="([^"]+)"[^>]*>(.*?)</textarea>', form_html, flags=re.S):
        data[name] = htmllib.unescape(body.strip("\n"))
    return data


def kept_list(form_html: str) -> list[str]:
    section = re.search(r'<fieldset class="spec-group" id="kept-settings">(.*?)</fieldset>', form_html, re.S)
    return [htmllib.unescape(item) for item in re.findall(r"<code>(.*?)</code>", section.group(1))] if section else []


def test_saving_a_draft_unchanged_keeps_every_setting_written_through_the_api(client, draft):
    before = draft.spec
    page = client.get(f"/proposals/{draft.pk}/edit").content.decode()
    response = client.post(f"/proposals/{draft.pk}/edit", as_posted(page))
    assert response.status_code == 302, response.content.decode()[:3000]
    draft.refresh_from_db()
    assert draft.spec == before
    latest = ProposalRevision.objects.filter(proposal=draft).order_by("-number").first()
    assert latest.number == 2 and latest.spec["model"]["config"]["rope_theta"] == 500000.0
    assert latest.spec["model"]["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]


def test_the_edit_page_lists_the_settings_it_keeps_and_not_the_defaults(client, draft):
    page = client.get(f"/proposals/{draft.pk}/edit").content.decode()
    assert kept_list(page) == KEPT
    # head_dim was derived from the width and heads, rms_norm_eps is the default: neither was written.
    assert "head_dim" not in page and "rms_norm_eps" not in page


def test_a_changed_input_keeps_the_hidden_settings_and_re_derives_what_followed_it(client, draft):
    page = client.get(f"/proposals/{draft.pk}/edit").content.decode()
    response = client.post(f"/proposals/{draft.pk}/edit", {**as_posted(page), "hidden_size": "64"})
    assert response.status_code == 302, response.content.decode()[:3000]
    draft.refresh_from_db()
    config = draft.spec["model"]["config"]
    assert (config["hidden_size"], config["rope_theta"], config["hidden_act"]) == (64, 500000.0, "gelu")
    assert config["head_dim"] == 16  # follows the new width (64 / 4 heads), not the draft's 8
    assert draft.spec["model"]["lora"]["dropout"] == 0.1


def test_a_kept_setting_ticked_off_goes_back_to_its_default(client, draft):
    page = client.get(f"/proposals/{draft.pk}/edit").content.decode()
    response = client.post(f"/proposals/{draft.pk}/edit", {**as_posted(page),
                                                           "drop_kept": ["model.config.rope_theta"]})
    assert response.status_code == 302, response.content.decode()[:3000]
    draft.refresh_from_db()
    assert draft.spec["model"]["config"]["rope_theta"] == 10000.0
    assert draft.spec["model"]["config"]["hidden_act"] == "gelu"
    assert kept_list(client.get(f"/proposals/{draft.pk}/edit").content.decode()) == [
        setting for setting in KEPT if "rope_theta" not in setting]


def test_clearing_the_lora_rank_drops_the_lora_settings_with_it(client, draft):
    page = client.get(f"/proposals/{draft.pk}/edit").content.decode()
    response = client.post(f"/proposals/{draft.pk}/edit", {**as_posted(page), "lora_rank": "", "lora_alpha": ""})
    assert response.status_code == 302, response.content.decode()[:3000]
    draft.refresh_from_db()
    assert draft.spec["model"]["lora"] is None and draft.spec["model"]["config"]["rope_theta"] == 500000.0


def test_switching_the_architecture_drops_the_settings_the_new_one_refuses_and_says_so(client, draft):
    page = client.get(f"/proposals/{draft.pk}/edit").content.decode()
    response = client.post(f"/proposals/{draft.pk}/edit", {**as_posted(page), "arch": "gpt2"}, follow=True)
    assert response.redirect_chain, response.content.decode()[:3000]
    draft.refresh_from_db()
    model = draft.spec["model"]
    assert model["arch"] == "gpt2"
    assert not {"rope_theta", "hidden_act", "hidden_size"} & set(model["config"])
    assert model["lora"]["target_modules"] == ["c_attn"]  # gpt2's own, not the Llama's module names
    assert model["lora"]["dropout"] == 0.1  # LoRA settings that are not architecture-bound stay
    shown = htmllib.unescape(response.content.decode())
    assert "Not carried over to gpt2" in shown
    for setting in ("model.config.rope_theta = 500000.0", 'model.config.hidden_act = "gelu"',
                    'model.lora.target_modules = ["q_proj", "k_proj", "v_proj"]'):
        assert setting in shown, setting
    previous = ProposalRevision.objects.get(proposal=draft, number=1)
    assert previous.spec["model"]["config"]["rope_theta"] == 500000.0


def test_a_kept_setting_the_shown_inputs_depend_on_is_listed_and_dropping_it_is_refused(client, member_client,
                                                                                         member):
    # A Llama whose width only works with its explicit head_dim: the form has no head_dim input.
    spec = {**LLAMA_SPEC, "model": {**LLAMA_SPEC["model"], "lora": None, "config": {
        **LLAMA_SPEC["model"]["config"], "hidden_size": 36, "head_dim": 8}}}
    response = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Odd width", "spec": spec,
                                                         "open": False},
                                  format="json")
    assert response.status_code == 201, response.content
    proposal = Proposal.objects.get()
    client.force_login(member)
    page = client.get(f"/proposals/{proposal.pk}/edit").content.decode()
    assert "model.config.head_dim = 8" in kept_list(page)
    unchanged = client.post(f"/proposals/{proposal.pk}/edit", as_posted(page))
    assert unchanged.status_code == 302
    refused = client.post(f"/proposals/{proposal.pk}/edit", {**as_posted(page),
                                                             "drop_kept": ["model.config.head_dim"]})
    assert refused.status_code == 400
    # Without it head_dim is derived as 36 / 4 = 9, which rotary embeddings refuse: said by the kept list.
    errors = re.search(r'id="id_drop_kept-errors">(.*?)</ul>', refused.content.decode(), re.S)
    assert errors and "head_dim (9) must be even" in errors.group(1)
    proposal.refresh_from_db()
    assert proposal.spec["model"]["config"]["head_dim"] == 8


@pytest.mark.parametrize(("chunk", "listed"), [(1024, True), (32768, True), (4096, False)])
def test_a_sparse_chunk_set_through_the_api_is_kept_without_an_input(client, member_client, member, chunk, listed):
    """sparse_chunk has no input: a chunk the member chose is listed and kept; the sparse default follows the
    compression shown in the form, as when the form alone saves a draft."""
    spec = {"diloco": {"compression": "topk2", "sparse_chunk": chunk}}
    response = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Sparse chunks",
                                                         "spec": spec, "open": False}, format="json")
    assert response.status_code == 201, response.content
    proposal = Proposal.objects.get()
    client.force_login(member)
    page = client.get(f"/proposals/{proposal.pk}/edit").content.decode()
    assert 'name="sparse_chunk"' not in page
    assert (f"diloco.sparse_chunk = {chunk}" in kept_list(page)) is listed
    before = proposal.spec
    assert client.post(f"/proposals/{proposal.pk}/edit", as_posted(page)).status_code == 302
    proposal.refresh_from_db()
    assert proposal.spec == before and proposal.spec["diloco"]["sparse_chunk"] == chunk
