"""Atom feeds of proposals and of the public ledger (Django's syndication framework)."""

from __future__ import annotations

import json

from django.contrib.syndication.views import Feed
from django.urls import reverse
from django.utils.feedgenerator import Atom1Feed
from django.utils.html import escape

from governance.markdown import render_markdown
from governance.models import Proposal
from ledger.models import Entry

FEED_SIZE = 50


class ProposalsFeed(Feed):
    feed_type = Atom1Feed
    title = "Agora proposals"
    subtitle = "Training runs and guardrails put to the members' vote."

    def link(self):
        return reverse("governance:proposal_list")

    def items(self):
        return Proposal.objects.exclude(status=Proposal.Status.DRAFT).select_related("author").order_by("-created_at", "-id")[:FEED_SIZE]

    def item_title(self, item: Proposal) -> str:
        return f"#{item.pk} {item.title} ({item.get_status_display()})"

    def item_description(self, item: Proposal) -> str:
        return render_markdown(item.body) + f"<p>Content hash <code>{item.content_hash}</code></p>"

    def item_author_name(self, item: Proposal) -> str:
        return item.author.username

    def item_pubdate(self, item: Proposal):
        return item.opens_at or item.created_at

    def item_updateddate(self, item: Proposal):
        return item.closed_at or item.opens_at or item.created_at

    def item_categories(self, item: Proposal):
        return [item.kind, item.status]


class LedgerFeed(Feed):
    feed_type = Atom1Feed
    title = "Agora public ledger"
    subtitle = "The latest entries of the hash-chained ledger."

    def link(self):
        return reverse("ledger:index")

    def items(self):
        return Entry.objects.order_by("-seq")[:FEED_SIZE]

    def item_title(self, item: Entry) -> str:
        return f"{item.seq} {item.action} {item.subject}"

    def item_description(self, item: Entry) -> str:
        text = json.dumps(item.as_chain_dict(), sort_keys=True, indent=2, ensure_ascii=False)
        return f"<pre>{escape(text)}</pre>"

    def item_link(self, item: Entry) -> str:
        return reverse("ledger:index") + f"?subject={item.subject}#seq-{item.seq}"

    def item_guid(self, item: Entry) -> str:
        return f"agora-ledger:{item.seq}:{item.hash}"

    def item_pubdate(self, item: Entry):
        return item.created_at
