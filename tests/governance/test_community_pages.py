"""Pages around the vote: htmx updates of votes and ledger, JSON that re-hashes, drafts with history,
threaded comments, the home page of what needs me, Atom feeds."""

from __future__ import annotations

import html as htmllib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from django.test import override_settings
from django.urls import reverse

from governance import services
from governance.models import Comment, Proposal, ProposalRevision
from ledger.models import Entry
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db
ATOM = "{http://www.w3.org/2005/Atom}"


def snippet_output(snippet: str, json_text: str, tmp_path, name: str) -> str:
    """Run the page's 'verify this hash' snippet in a shell, on the JSON exactly as the page shows it."""
    (tmp_path / name).write_text(json_text, encoding="utf-8")
    command = snippet.replace("python3 ", f"{sys.executable} ", 1)
    done = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def pre_blocks(html: str) -> list[str]:
    return [htmllib.unescape(block) for block in re.findall(r'<pre class="spec">(.*?)</pre>', html, flags=re.S)]


@override_settings(AGORA_EARLY_CLOSE=False)
def test_an_htmx_vote_also_updates_the_votes_list_and_the_ledger_entries(client, member):
    proposal = services.proposal_submit(author=UserFactory(), kind="training", title="Live", spec={}, open_now=True)
    client.force_login(member)
    response = client.post(reverse("governance:proposal_vote", args=[proposal.pk]), {"choice": "yes"},
                           HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="vote-panel"')
    votes = re.search(r'<section id="votes-list" hx-swap-oob="true">(.*?)</section>', html, flags=re.S).group(1)
    assert f'data-voter="{member.username}"' in votes
    ledger = re.search(r'<section id="proposal-ledger" hx-swap-oob="true">(.*?)</section>', html, flags=re.S).group(1)
    seq = Entry.objects.get(action="vote.cast").seq
    assert f"<td>{seq}</td>" in ledger and "vote.cast" in ledger
    assert 'id="proposal-status" hx-swap-oob="true">Voting<' in html


@override_settings(AGORA_QUORUM_MIN=1, AGORA_QUORUM_FRACTION=0)
def test_an_htmx_vote_that_settles_the_outcome_shows_the_close(client, member):
    proposal = services.proposal_submit(author=member, kind="training", title="Settle", spec={}, open_now=True)
    others = [u for u in UserFactory._meta.model.objects.exclude(pk=member.pk)]
    assert others == []  # the author alone may vote: one yes settles it
    client.force_login(member)
    html = client.post(reverse("governance:proposal_vote", args=[proposal.pk]), {"choice": "yes"},
                       HTTP_HX_REQUEST="true").content.decode()
    assert 'id="proposal-status" hx-swap-oob="true">Succeeded<' in html
    assert "proposal.closed" in html


def test_the_spec_and_ledger_entries_are_json_whose_hash_the_snippets_reproduce(client, member, tmp_path):
    proposal = services.proposal_submit(author=member, kind="training", title="Hash me", spec={}, open_now=True)
    html = client.get(proposal.get_absolute_url()).content.decode()
    blocks = pre_blocks(html)
    spec_json, spec_snippet = blocks[0], blocks[1]
    assert "'" not in spec_json and "None" not in spec_json and "null" in spec_json  # JSON, not a repr
    assert snippet_output(spec_snippet, spec_json, tmp_path, "spec.json") == proposal.content_hash

    entry = Entry.objects.get(subject=proposal.ledger_subject, action="proposal.opened")
    entry_json = next(b for b in blocks if f'"seq": {entry.seq},' in b)
    entry_snippet = next(b for b in blocks if "entry.json" in b)
    assert snippet_output(entry_snippet, entry_json, tmp_path, "entry.json") == entry.hash
    ledger_html = client.get("/ledger/").content.decode()
    assert "{&#x27;" not in ledger_html and f"&quot;hash&quot;: &quot;{entry.hash}&quot;" in ledger_html


def test_the_spec_table_shows_json_values_not_python_ones(client, member):
    proposal = services.proposal_submit(author=member, kind="training", title="Table", spec={}, open_now=True)
    html = client.get(proposal.get_absolute_url()).content.decode()
    table = html[html.index('class="spec-table"'):html.index("</table>", html.index('class="spec-table"'))]
    assert "<td>false</td>" in table and "<td>true</td>" in table  # overlap, allow_cpu
    assert ">False<" not in table and ">True<" not in table


def test_the_author_edits_a_draft_and_every_revision_is_kept_and_diffable(client, member, other_member):
    proposal = services.proposal_submit(author=member, kind="training", title="First title", body="Old body",
                                        spec={"diloco": {"rounds": 3}})
    first_hash = proposal.content_hash
    client.force_login(other_member)
    assert client.get(f"/proposals/{proposal.pk}/edit").status_code == 403
    client.force_login(member)
    form = client.get(f"/proposals/{proposal.pk}/edit").content.decode()
    assert 'value="First title"' in form and 'id="id_rounds"' in form
    response = client.post(f"/proposals/{proposal.pk}/edit", {
        "title": "Second title", "body": "New body", "rounds": "5", "voting_hours": "", "open_now": "",
        **{k: v for k, v in _defaults(form).items() if k not in ("title", "body", "rounds", "voting_hours", "open_now")},
    })
    assert response.status_code == 302, response.content.decode()[:3000]
    proposal.refresh_from_db()
    assert proposal.title == "Second title" and proposal.spec["diloco"]["rounds"] == 5
    assert proposal.content_hash != first_hash and proposal.status == "draft"
    revisions = list(ProposalRevision.objects.filter(proposal=proposal).order_by("number"))
    assert [r.number for r in revisions] == [1, 2] and revisions[0].content_hash == first_hash
    edited = Entry.objects.get(action="proposal.edited").payload
    assert edited["previous_content_hash"] == first_hash and edited["content_hash"] == proposal.content_hash
    history = htmllib.unescape(client.get(f"/proposals/{proposal.pk}/history").content.decode())
    assert "-# First title" in history and "+# Second title" in history
    assert '-    "rounds": 3,' in history and '+    "rounds": 5,' in history

    services.proposal_open(proposal=proposal, by=member)
    response = client.post(f"/proposals/{proposal.pk}/edit", {"title": "Too late"})
    assert response.status_code == 302
    proposal.refresh_from_db()
    assert proposal.title == "Second title"


def _defaults(form_html: str) -> dict:
    """The values the edit form shows, as a browser would post them back."""
    data = {}
    for name, value in re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form_html):
        data.setdefault(name, htmllib.unescape(value))
    for name in re.findall(r'<input[^>]*type="checkbox"[^>]*name="([^"]+)"[^>]*checked', form_html):
        data[name] = "on"
    for name, body in re.findall(r'<select name="([^"]+)"[^>]*>(.*?)</select>', form_html, flags=re.S):
        chosen = re.search(r'<option value="([^"]*)"[^>]*selected', body)
        if chosen:
            data[name] = chosen.group(1)
    data.pop("csrfmiddlewaretoken", None)
    return data


def test_edit_service_refuses_others_and_open_proposals(member, other_member):
    from governance.errors import NotAllowed, ProposalStateError

    proposal = services.proposal_submit(author=member, kind="training", title="Mine", spec={})
    with pytest.raises(NotAllowed):
        services.proposal_edit(proposal=proposal, by=other_member, title="Theirs", spec={})
    services.proposal_open(proposal=proposal, by=member)
    with pytest.raises(ProposalStateError):
        services.proposal_edit(proposal=proposal, by=member, title="Changed", spec={})
    assert ProposalRevision.objects.filter(proposal=proposal).count() == 1


def test_replies_thread_under_their_comment_and_a_foreign_parent_is_refused(client, member):
    from rest_framework import serializers

    proposal = services.proposal_submit(author=member, kind="training", title="Talk", spec={})
    other = services.proposal_submit(author=member, kind="training", title="Elsewhere", spec={})
    first = services.comment_post(proposal=proposal, author=member, body="First")
    second = services.comment_post(proposal=proposal, author=member, body="Second")
    client.force_login(member)
    client.post(f"/proposals/{proposal.pk}/comment", {"body": "A reply to the first", "parent": first.pk})
    reply = Comment.objects.get(body="A reply to the first")
    assert reply.parent == first
    html = client.get(proposal.get_absolute_url()).content.decode()
    order = [html.index(f'id="comment-{c.pk}"') for c in (first, reply, second)]
    assert order == sorted(order)
    assert f'id="comment-{reply.pk}" style="margin-left: 1rem"' in html
    foreign = services.comment_post(proposal=other, author=member, body="Not here")
    with pytest.raises(serializers.ValidationError) as info:
        services.comment_post(proposal=proposal, author=member, body="Bad", parent_id=foreign.pk)
    assert "parent" in info.value.detail
    assert not Comment.objects.filter(body="Bad").exists()


@override_settings(AGORA_EARLY_CLOSE=False)
def test_the_home_page_shows_what_needs_me(client, member):
    author = UserFactory()
    waiting = services.proposal_submit(author=author, kind="training", title="Waiting for me", spec={}, open_now=True)
    voted = services.proposal_submit(author=author, kind="training", title="Already voted", spec={}, open_now=True)
    services.vote_cast(proposal=voted, voter=member, choice="yes")
    services.proposal_submit(author=member, kind="training", title="My own draft", spec={})
    client.force_login(member)
    html = client.get("/").content.decode()
    needs = html[html.index('id="needs-me"'):html.index('id="my-drafts"')]
    assert "Waiting for me" in needs and "Already voted" not in needs
    assert "My own draft" in html[html.index('id="my-drafts"'):]
    assert waiting.get_absolute_url() in needs
    client.logout()
    assert 'id="needs-me"' not in client.get("/").content.decode()


def test_atom_feeds_of_proposals_and_of_the_ledger(client, member):
    services.proposal_submit(author=member, kind="training", title="Hidden draft", spec={})
    shown = services.proposal_submit(author=member, kind="training", title="Open & shown", spec={}, open_now=True)
    response = client.get("/feeds/proposals.atom")
    assert response["Content-Type"].startswith("application/atom+xml")
    feed = ET.fromstring(response.content)
    titles = [e.findtext(f"{ATOM}title") for e in feed.iter(f"{ATOM}entry")]
    assert titles == [f"#{shown.pk} Open & shown (Voting)"]
    ledger = ET.fromstring(client.get("/feeds/ledger.atom").content)
    entries = list(ledger.iter(f"{ATOM}entry"))
    assert len(entries) == Entry.objects.count()
    head = Entry.objects.order_by("-seq").first()
    assert entries[0].findtext(f"{ATOM}id") == f"agora-ledger:{head.seq}:{head.hash}"


def test_voting_hours_on_the_form(client, member, settings):
    settings.AGORA_VOTING_MIN = __import__("datetime").timedelta(hours=1)
    client.force_login(member)
    form = client.get("/proposals/new/?kind=training").content.decode()
    assert 'name="voting_hours"' in form
    data = _defaults(form)
    data.update(title="Quick vote", voting_hours="0.25", kind="training")
    response = client.post("/proposals/new/", data)
    assert response.status_code == 400 and "voting window must be between 1 and" in response.content.decode()
    assert not Proposal.objects.exists()
    data["voting_hours"] = "3"
    assert client.post("/proposals/new/", data).status_code == 302
    proposal = Proposal.objects.get()
    assert (proposal.closes_at - proposal.opens_at).total_seconds() == 3 * 3600
