"""Server-rendered pages: browse, detail with htmx voting, propose forms, guardrails, admin actions."""

import re

import pytest
from django.test import override_settings
from django.urls import reverse

from governance.markdown import render_markdown
from governance.models import Proposal, Vote
from tests.governance.factories import GuardrailFactory, ProposalFactory

pytestmark = pytest.mark.django_db


XSS = [
    "<script>alert('x')</script>",
    "[click](javascript:alert(1))",
    '<img src=x onerror="alert(1)">',
    '<a href="#" onclick="steal()">hi</a>',
    "<iframe src='https://evil.example'></iframe>",
    '<div style="background:url(javascript:alert(1))">x</div>',
    "<svg onload=alert(1)>",
]


@pytest.mark.parametrize("payload", XSS)
def test_markdown_is_sanitised(payload):
    html = render_markdown(f"# Title\n\n{payload}\n\n**bold**")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
    lowered = html.lower()
    for bad in ("<script", "javascript:", "onerror", "onclick", "onload", "<iframe", "style=", "<svg"):
        assert bad not in lowered, html


def test_detail_page_renders_sanitised_body_spec_hash_and_tally(client):
    proposal = ProposalFactory(status="active", body="Intro\n\n<script>alert(1)</script>\n\n- one\n- two")
    html = client.get(proposal.get_absolute_url()).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "<li>one</li>" in html
    assert proposal.content_hash in html
    assert "diloco.inner_lr" in html and 'id="vote-panel"' in html


@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_htmx_vote_returns_only_the_panel_with_the_new_tally(logged_in, member):
    proposal = ProposalFactory(status="active")
    url = reverse("governance:proposal_vote", args=[proposal.pk])
    response = logged_in.post(url, {"choice": "yes"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="vote-panel"') and "<html" not in html
    assert re.search(r'data-tally="yes">1<', html)
    assert 'data-my-vote>yes<' in html
    response = logged_in.post(url, {"choice": "no"}, HTTP_HX_REQUEST="true")
    assert re.search(r'data-tally="yes">0<', response.content.decode())
    assert Vote.objects.get().choice == "no"


def test_plain_vote_post_redirects_and_anonymous_is_sent_to_login(client, member):
    proposal = ProposalFactory(status="active")
    url = reverse("governance:proposal_vote", args=[proposal.pk])
    response = client.post(url, {"choice": "yes"})
    assert response.status_code == 302 and "/accounts/login/" in response.url
    assert not Vote.objects.exists()
    client.force_login(member)
    assert client.post(url, {"choice": "yes"}).url == proposal.get_absolute_url()
    assert Vote.objects.count() == 1


def test_list_page_filters_and_shows_empty_state(client):
    ProposalFactory(title="Guard the output", kind="guardrail", status="active")
    ProposalFactory(title="Train more", kind="training", status="defeated")
    html = client.get("/proposals/?kind=guardrail").content.decode()
    assert "Guard the output" in html and "Train more" not in html
    html = client.get("/proposals/?q=nothing-like-this").content.decode()
    assert "No proposal matches these filters" in html


def test_training_form_submits_and_opens_by_default(logged_in):
    page = logged_in.get("/proposals/new/?kind=training").content.decode()
    assert 'name="inner_lr"' in page and 'value="0.0004"' in page and "Inner learning rate" in page
    response = logged_in.post("/proposals/new/", {
        "kind": "training", "title": "Train byte-gpt on docs", "body": "Because.", "open_now": "on",
        "model_name": "byte-gpt-small", "model_init": "current", "n_layer": "2", "n_embd": "64", "n_head": "4",
        "block_size": "64", "dataset_source": "builtin:python-docs", "dataset_sha256": "",
        "heldout_fraction": "0.1", "rounds": "4", "inner_lr": "0.001", "allow_cpu": "on",
    })
    proposal = Proposal.objects.get()
    assert response.status_code == 302 and response.url == proposal.get_absolute_url()
    assert proposal.status == "active"
    assert proposal.spec["diloco"]["rounds"] == 4 and proposal.spec["diloco"]["inner_lr"] == 0.001
    assert proposal.spec["diloco"]["aggregator"] == "trimmed_mean"  # left blank: default


def test_form_errors_match_the_api_and_sit_on_the_right_input(logged_in, member_client):
    form = logged_in.post("/proposals/new/", {"kind": "training", "title": "Bad", "inner_lr": "fast",
                                              "min_workers": "5"})
    assert form.status_code == 400
    api = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Bad",
                                                    "spec": {"diloco": {"inner_lr": "fast"}}}, format="json")
    message = api.json()["fields"]["spec.diloco.inner_lr"][0]
    html = form.content.decode()
    assert f'<ul class="errorlist" id="id_inner_lr-errors"><li>{message}</li>' in html
    assert not Proposal.objects.exists()


def test_guardrail_form_names_the_bad_pattern_and_stores_nothing(logged_in):
    response = logged_in.post("/proposals/new/", {
        "kind": "guardrail", "title": "Filter", "action": "adopt", "guardrail_kind": "data_filter",
        "patterns": "fine\n(broken\n", "description": "d"})
    assert response.status_code == 400
    assert "Pattern 2: Not a valid regular expression" in response.content.decode()
    assert not Proposal.objects.exists()


def test_guardrail_form_saves_a_draft_with_one_pattern_per_line(logged_in):
    logged_in.post("/proposals/new/", {"kind": "guardrail", "title": "Filter keys", "action": "adopt",
                                       "guardrail_kind": "output_filter", "patterns": " sk-[a-z0-9]{20}\r\n\r\nAKIA\n",
                                       "description": "No keys."})
    proposal = Proposal.objects.get()
    assert proposal.status == "draft"  # open_now unticked
    assert proposal.spec["patterns"] == ["sk-[a-z0-9]{20}", "AKIA"]


def test_propose_retiring_button_prefills_the_form(logged_in):
    guardrail = GuardrailFactory(title="No secrets")
    page = logged_in.get("/guardrails/").content.decode()
    assert "No secrets" in page and f"retire={guardrail.pk}" in page and "Propose retiring this" in page
    form = logged_in.get(f"/proposals/new/?kind=guardrail&retire={guardrail.pk}").content.decode()
    assert f'<option value="{guardrail.pk}" selected>' in form
    assert 'value="retire" selected' in form and "Retire guardrail #" in form


def test_guardrails_page_empty_state(client):
    assert "No guardrails are in force yet" in client.get("/guardrails/").content.decode()


def test_staff_sees_approve_and_veto_and_members_do_not(client, member, staff):
    proposal = ProposalFactory(status="succeeded")
    client.force_login(member)
    assert 'id="staff-decision"' not in client.get(proposal.get_absolute_url()).content.decode()
    assert client.post(reverse("governance:proposal_approve", args=[proposal.pk])).status_code == 403
    client.force_login(staff)
    assert 'id="staff-decision"' in client.get(proposal.get_absolute_url()).content.decode()
    client.post(reverse("governance:proposal_veto", args=[proposal.pk]), {"reason": ""})
    proposal.refresh_from_db()
    assert proposal.status == "succeeded"  # a veto without reason is refused
    client.post(reverse("governance:proposal_approve", args=[proposal.pk]))
    proposal.refresh_from_db()
    assert proposal.status == "approved"


def test_admin_actions_go_through_the_services(client, staff):
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    approve_me, veto_me, defeated = (ProposalFactory(status="succeeded"), ProposalFactory(status="succeeded"),
                                     ProposalFactory(status="defeated"))
    changelist = reverse("admin:governance_proposal_changelist")
    client.post(changelist, {"action": "approve_selected", "_selected_action": [approve_me.pk, defeated.pk]})
    confirm = client.post(changelist, {"action": "veto_selected", "_selected_action": [veto_me.pk]})
    assert confirm.status_code == 200 and b"reason" in confirm.content
    client.post(changelist, {"action": "veto_selected", "_selected_action": [veto_me.pk], "apply": "Veto",
                             "reason": "Licence unclear"})
    for proposal in (approve_me, veto_me, defeated):
        proposal.refresh_from_db()
    assert (approve_me.status, veto_me.status, defeated.status) == ("approved", "vetoed", "defeated")
    assert veto_me.veto_reason == "Licence unclear"
    assert client.get(reverse("admin:governance_proposal_change", args=[approve_me.pk])).status_code == 200


def test_comment_form_and_profile_and_home(client, member):
    proposal = ProposalFactory(status="active", author=member)
    client.force_login(member)
    client.post(reverse("governance:proposal_comment", args=[proposal.pk]), {"body": "Nice _idea_"})
    assert "<em>idea</em>" in client.get(proposal.get_absolute_url()).content.decode()
    assert proposal.title in client.get("/accounts/profile/").content.decode()
    assert client.get("/").status_code == 200


def test_training_form_labels_read_as_words(client):
    from tests.factories import UserFactory

    client.force_login(UserFactory())
    html = client.get("/proposals/new/?kind=training").content.decode()
    for label in ("Embedding width", "Least GPU memory (MB)", "Inner steps per round (H)", "Workers per round (k)"):
        assert f">{label}" in html, label
    for raw in ("N embd", "Min vram mb", "Inner lr"):
        assert raw not in html, raw
