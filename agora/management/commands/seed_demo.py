"""Seed a demo: members, an admin, a guardrail in force, open proposals, a draft, two passed training
proposals waiting for staff (one to approve, one to veto), a community model and an approved training
proposal that becomes a run as soon as Celery picks it up. Safe to run again: it does nothing when the
demo is already there.

The ids are part of the README (its curl examples and "What the demo seeds"), checked by
tests/docs/test_readme_examples.py: #1 the guardrail in force, #2 the approved run, #3 and #4 open, #5 the
draft, #6 and #7 waiting for staff.

The demo's people are eligible voters under any account-age rule: their e-mail addresses are verified and
their accounts date from long ago. Members who sign up in the browser verify through the console mail."""

import time
from datetime import UTC, datetime, timedelta

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.test.utils import override_settings
from django.utils import timezone

from governance import services as gov
from governance.models import Proposal
from training.services import community_model_ensure

PASSWORD = "agora-demo"
FOUNDED = datetime(2024, 1, 1, tzinfo=UTC)  # the demo members' accounts are old enough to vote
DEMO_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64}  # the smallest built-in, byte-level
# A Llama-style model of about a million parameters with a 1024-token BPE trained on the corpus: on two CPU
# cores a round (two agents, 30 steps each) takes well under a minute, and the playground's text visibly turns
# from token soup into documentation-shaped words and code over the first rounds.
LLAMA_DEMO = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 1024}

TRAINING_SPEC = {
    "model": {"name": "llama-demo", "arch": "llama", "config": LLAMA_DEMO, "init": "latest"},
    "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.05},
    "tokenizer": {"kind": "bpe", "vocab_size": 1024},
    "diloco": {"rounds": 40, "workers_per_round": 2, "min_workers": 1, "inner_steps": 30, "inner_lr": 0.002,
               "batch_size": 8, "seq_len": 128, "warmup": 5, "compression": "int8", "aggregator": "mean",
               "round_timeout_s": 180},
    "hardware": {"min_vram_mb": 0, "allow_cpu": True},
}
LONGER_SPEC = {
    **TRAINING_SPEC,
    "diloco": {**TRAINING_SPEC["diloco"], "rounds": 200, "workers_per_round": 4, "aggregator": "trimmed_mean"},
    "hardware": {"min_vram_mb": 8000, "allow_cpu": False},
}
LOWER_LR_SPEC = {
    **TRAINING_SPEC,
    "diloco": {**TRAINING_SPEC["diloco"], "rounds": 20, "inner_lr": 0.001},
}
# A source nobody can check the licence of: the README's veto example turns it down.
FORUM_DUMP_SPEC = {
    **TRAINING_SPEC,
    "dataset": {"source": "https://forum.example.org/exports/all-posts.txt",
                "sha256": "9f2c1a8e4b7d3f6a0c5e8b1d4a7f2c9e6b3d0a5f8c1e4b7a2d9f6c3e0b5a8d1f", "heldout_fraction": 0.05},
}
GUARDRAIL_SPEC = {
    "action": "adopt",
    "kind": "output_filter",
    "patterns": [r"\bpassword\s*[:=]", r"BEGIN (RSA|OPENSSH) PRIVATE KEY"],
    "description": "Never let the playground print things that look like credentials.",
}
DATA_FILTER_SPEC = {
    "action": "adopt",
    "kind": "data_filter",
    "patterns": [r"\bdeprecated since version 2\."],
    "description": "Drop documentation sections about long-gone Python 2 behaviour before training.",
}


class Command(BaseCommand):
    help = "Seed demo members, proposals, a guardrail and an approved training run (idempotent)."

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(username="alice").exists():
            self.stdout.write("demo data already present")
            return
        with transaction.atomic():
            admin = User.objects.create_user("admin", "admin@example.org", PASSWORD, is_staff=True,
                                             is_superuser=True, date_joined=FOUNDED)
            members = [User.objects.create_user(name, f"{name}@example.org", PASSWORD, date_joined=FOUNDED)
                       for name in ("alice", "bob", "carol", "dave")]
            for user in (admin, *members):
                EmailAddress.objects.create(user=user, email=user.email, primary=True, verified=True)
            alice, bob, carol, dave = members
            community_model_ensure(slug="byte-gpt-demo", name="Byte GPT (demo)", arch="byte-gpt",
                                   config=DEMO_MODEL, seed=0)

        # Proposals decided in a short window so the demo starts with a guardrail in force and a run going.
        with override_settings(AGORA_VOTING_PERIOD=timedelta(seconds=2), AGORA_QUORUM_MIN=3):
            guardrail = gov.proposal_submit(author=alice, kind=Proposal.Kind.GUARDRAIL,
                                            title="Keep credentials out of generated text",
                                            body="Block playground outputs that look like passwords or keys.",
                                            spec=GUARDRAIL_SPEC, open_now=True)
            training = gov.proposal_submit(
                author=bob, kind=Proposal.Kind.TRAINING, title="Teach the demo model Python's documentation",
                body="Forty DiLoCo rounds of a small Llama-style model with a BPE tokenizer trained on "
                     "`builtin:python-docs`, two CPU workers a round. Every accepted round is a new version: watch "
                     "the playground's text improve.\n\n* int8 pseudo-gradients\n* mean aggregation with screening\n",
                spec=TRAINING_SPEC, open_now=True)
            for voter in members[:3]:
                gov.vote_cast(proposal=guardrail, voter=voter, choice="yes")
                gov.vote_cast(proposal=training, voter=voter, choice="yes" if voter != carol else "abstain")
            wait = (max(guardrail.closes_at, training.closes_at) - timezone.now()).total_seconds()
            time.sleep(max(0.0, wait) + 0.1)
            gov.proposal_close(proposal_id=guardrail.pk)
            gov.proposal_close(proposal_id=training.pk)
        gov.proposal_approve(proposal=Proposal.objects.get(pk=training.pk), by=admin)

        # Open for votes in the browser.
        data_filter = gov.proposal_submit(author=carol, kind=Proposal.Kind.GUARDRAIL,
                                          title="Drop Python 2 material from training data",
                                          body="Sections about Python 2 only confuse a model of today's Python.",
                                          spec=DATA_FILTER_SPEC, open_now=True)
        gov.vote_cast(proposal=data_filter, voter=dave, choice="yes")
        gov.proposal_submit(author=dave, kind=Proposal.Kind.TRAINING, title="A longer run on GPU volunteers",
                            body="Two hundred rounds with four GPU workers a round, trimmed-mean aggregation.",
                            spec=LONGER_SPEC, open_now=True)
        gov.proposal_submit(author=alice, kind=Proposal.Kind.TRAINING, title="Draft: a wider model",
                            body="Still a draft: try `hidden_size` 256.", spec=TRAINING_SPEC)

        # Passed, waiting for staff: three yes votes of five settle each at once (the early close).
        waiting = [
            gov.proposal_submit(author=carol, kind=Proposal.Kind.TRAINING,
                                title="Twenty more rounds at a lower learning rate",
                                body="Continue the demo model from its latest version with half the inner "
                                     "learning rate.", spec=LOWER_LR_SPEC, open_now=True),
            gov.proposal_submit(author=dave, kind=Proposal.Kind.TRAINING, title="Fine-tune on a forum dump",
                                body="A dump of a programming forum's posts. Its licence is not stated.",
                                spec=FORUM_DUMP_SPEC, open_now=True),
        ]
        for proposal in waiting:
            for voter in (alice, bob, dave):
                gov.vote_cast(proposal=Proposal.objects.get(pk=proposal.pk), voter=voter, choice="yes")
        self.stdout.write(self.style.SUCCESS(
            f"demo seeded: users admin, alice, bob, carol, dave (password {PASSWORD}); "
            f"training proposal #{training.pk} approved; #{waiting[0].pk} and #{waiting[1].pk} wait for staff"))
