"""A robust aggregator must be asked with enough workers per round to be robust; the defaults are."""

import pytest

from governance.models import Proposal
from governance.specs import spec_normalise
from ledger.models import Entry

pytestmark = pytest.mark.django_db
URL = "/api/v1/proposals/"


def test_the_default_aggregator_is_a_trimmed_mean_that_trims():
    d = spec_normalise(kind="training", spec={})["diloco"]
    assert d["aggregator"] == "trimmed_mean"
    assert d["workers_per_round"] * d["trim_fraction"] >= 1  # drops the largest and smallest value
    assert d["min_workers"] >= 3


@pytest.mark.parametrize(
    ("diloco", "needs"),
    [
        ({"aggregator": "trimmed_mean", "workers_per_round": 2, "min_workers": 1}, "workers_per_round × trim_fraction"),
        ({"aggregator": "trimmed_mean", "workers_per_round": 4, "min_workers": 3, "trim_fraction": 0.2},
         "trims nothing"),
        ({"aggregator": "trimmed_mean", "workers_per_round": 8, "min_workers": 3, "trim_fraction": 0}, "trims nothing"),
        ({"aggregator": "median", "workers_per_round": 2, "min_workers": 1}, "at least 3 workers"),
        ({"aggregator": "norm_clipped_mean", "workers_per_round": 2, "min_workers": 2}, "at least 3 workers"),
    ],
)
def test_a_robust_aggregator_with_too_few_workers_is_refused_naming_both_fields(member_client, diloco, needs):
    before = Entry.objects.count()
    response = member_client.post(URL, {"kind": "training", "title": "Too few", "spec": {"diloco": diloco}},
                                  format="json")
    assert response.status_code == 400, response.json()
    fields = response.json()["fields"]
    assert needs in fields["spec.diloco.aggregator"][0]
    assert fields["spec.diloco.workers_per_round"] == fields["spec.diloco.aggregator"]
    assert not Proposal.objects.exists() and Entry.objects.count() == before


@pytest.mark.parametrize(
    "diloco",
    [
        {"aggregator": "mean", "workers_per_round": 1, "min_workers": 1},  # the demo's choice: no robustness claimed
        {"aggregator": "trimmed_mean", "workers_per_round": 4, "min_workers": 3},
        {"aggregator": "trimmed_mean", "workers_per_round": 3, "min_workers": 2, "trim_fraction": 0.34},
        {"aggregator": "median", "workers_per_round": 3, "min_workers": 3},
        {"aggregator": "norm_clipped_mean", "workers_per_round": 5, "min_workers": 3},
    ],
)
def test_enough_workers_are_accepted(diloco):
    assert spec_normalise(kind="training", spec={"diloco": diloco})["diloco"]["aggregator"] == diloco["aggregator"]


def test_trim_fraction_is_bounded(member_client):
    response = member_client.post(URL, {"kind": "training", "title": "Trim all", "spec": {
        "diloco": {"trim_fraction": 0.5}}}, format="json")
    assert response.status_code == 400
    assert "spec.diloco.trim_fraction" in response.json()["fields"]
