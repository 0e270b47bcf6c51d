"""A member who turns a sparse compression on in the web form gets the sparse settings the API gives (outer lr 2,
error-feedback β 0.95, a norm-clipped mean) for what the form still shows at the dense defaults, and keeps
whatever they typed themselves; a draft that is already sparse keeps what its form shows."""

import pytest

from governance.models import Proposal

pytestmark = pytest.mark.django_db

FORM = {"kind": "training", "title": "Sparse run", "body": "Less traffic.", "model_name": "docs-gpt",
        "model_init": "scratch", "dataset_source": "builtin:python-docs", "heldout_fraction": "0.1", "rounds": "3",
        "allow_cpu": "on", "workers_per_round": "4", "min_workers": "3",
        # what the form shows before the member touches these: the dense defaults
        "outer_lr": "0.7", "outer_momentum": "0.9", "aggregator": "trimmed_mean"}


def _diloco(proposal):
    d = proposal.spec["diloco"]
    return d["compression"], d["outer_lr"], d["outer_momentum"], d["aggregator"]


def test_choosing_topk2_in_the_form_gets_the_sparse_settings(logged_in):
    response = logged_in.post("/proposals/new/", {**FORM, "compression": "topk2"})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert _diloco(Proposal.objects.get()) == ("topk2", 2.0, 0.95, "norm_clipped_mean")
    assert Proposal.objects.get().spec["diloco"]["sparse_chunk"] == 4096  # no input: the sparse default


def test_what_the_member_typed_is_kept(logged_in):
    logged_in.post("/proposals/new/", {**FORM, "compression": "topk4", "outer_lr": "1.5", "aggregator": "mean"})
    assert _diloco(Proposal.objects.get()) == ("topk4", 1.5, 0.95, "mean")


def test_a_dense_run_keeps_the_dense_defaults(logged_in):
    logged_in.post("/proposals/new/", {**FORM, "compression": "int8"})
    assert _diloco(Proposal.objects.get()) == ("int8", 0.7, 0.9, "trimmed_mean")
    assert Proposal.objects.get().spec["diloco"]["sparse_chunk"] == 4096


def test_a_sparse_draft_keeps_what_its_form_shows(logged_in, member_client):
    created = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Sparse", "body": "b", "open": False, "spec": {
        "diloco": {"compression": "topk2", "outer_lr": 0.7, "outer_momentum": 0.9, "aggregator": "mean"}}},
        format="json")
    assert created.status_code == 201, created.content
    proposal = Proposal.objects.get()
    assert _diloco(proposal) == ("topk2", 0.7, 0.9, "mean")
    html = logged_in.get(f"/proposals/{proposal.pk}/edit").content.decode()
    assert 'name="outer_lr" value="0.7"' in html
    response = logged_in.post(f"/proposals/{proposal.pk}/edit", {**FORM, "compression": "topk2",
                                                                 "aggregator": "mean"})
    assert response.status_code == 302
    proposal.refresh_from_db()
    assert _diloco(proposal) == ("topk2", 0.7, 0.9, "mean")
