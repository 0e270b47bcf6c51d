import pytest
from django.db import connection
from django.template.defaultfilters import floatformat
from django.test.utils import CaptureQueriesContext

from governance.models import Guardrail
from tests.governance.factories import GuardrailFactory
from tests.marketplace.factories import WorkerFactory
from training import services
from training.models import Round

from .factories import TINY_CONFIG, approved_proposal, train_update

pytestmark = pytest.mark.django_db


def _run_with_rounds(n_workers: int, rounds_done: int, *, finish: bool = False):
    from rest_framework.test import APIRequestFactory

    from training.serializers import task_payload

    run = services.run_start(proposal_id=approved_proposal(
        model={"name": f"m{n_workers}-{rounds_done}"},
        diloco={"workers_per_round": n_workers, "rounds": rounds_done + (0 if finish else 1)}).pk)
    request = APIRequestFactory().get("/")
    for index in range(1, rounds_done + 1):
        for _ in range(n_workers):
            worker = WorkerFactory(gpus=[])
            task = services.task_claim(worker=worker)
            data, metrics = train_update(task_payload(task, request=request, guardrails=[], max_upload_bytes=0))
            services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
        assert services.round_aggregate(round_id=Round.objects.get(run=run, index=index).pk)
    return run


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries)


def test_run_page_shows_progress_curve_contributors_and_ledger(client):
    run = _run_with_rounds(2, 2)
    response = client.get(f"/runs/{run.pk}/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "round 3 of 3" in html
    assert "<svg" in html and "held-out loss" in html
    assert "round.aggregated" in html and "run.created" in html
    assert 'hx-trigger="every 3s"' in html  # live while running
    for task in run.rounds.get(index=1).tasks.all():
        assert task.worker.name in html
    took = run.rounds.get(index=1).timings["aggregation_s"]
    assert f"{floatformat(took, 2)} s" in html  # how long the coordinator took over the round
    assert "Trained from fresh weights" in html  # tiny_spec's init is scratch
    for version in run.versions.all():
        assert f"/models/{run.model.slug}/v{version.number}.tar.gz" in html
    partial = client.get(f"/runs/{run.pk}/progress", HTTP_HX_REQUEST="true")
    assert partial.status_code == 200 and "<html" not in partial.content.decode()


def test_run_page_query_count_does_not_grow_with_rounds_and_workers(client):
    small = _run_with_rounds(1, 1, finish=True)
    list_one = _queries(client, "/runs/")
    big = _run_with_rounds(3, 2, finish=True)
    assert _queries(client, f"/runs/{small.pk}/") == _queries(client, f"/runs/{big.pk}/")
    assert _queries(client, "/runs/") == list_one
    assert _queries(client, "/models/") == 1


def test_lists_and_model_page(client):
    run = _run_with_rounds(1, 1)
    assert f"Run {run.pk}" in client.get("/runs/").content.decode()
    html = client.get("/models/").content.decode()
    assert run.model.slug in html
    page = client.get(f"/models/{run.model.slug}/").content.decode()
    versions = list(run.model.versions.all())
    assert [v.number for v in versions] == [1] and versions[0].run == run  # the accepted round 1
    for version in versions:
        assert f"/api/v1/checkpoints/{version.checkpoint_id}" in page
        assert f"/models/{run.model.slug}/v{version.number}.tar.gz" in page
        assert f"/playground/?model={run.model.slug}&amp;version={version.number}" in page
    assert client.get("/runs/").status_code == 200
    assert client.get("/models/nope/").status_code == 404


def test_empty_pages_explain_themselves(client, db):
    assert "No training runs yet" in client.get("/runs/").content.decode()
    assert "No community models yet" in client.get("/models/").content.decode()
    assert "No community model has weights yet" in client.get("/playground/").content.decode()


def test_runs_api(client):
    run = _run_with_rounds(2, 1)
    listing = client.get("/api/v1/runs/").json()
    assert listing["results"][0]["id"] == run.pk
    detail = client.get(f"/api/v1/runs/{run.pk}/").json()
    assert detail["status"] == "running" and detail["current_round"] == 2
    assert detail["rounds"][0]["accepted"] is True
    timings = detail["rounds"][0]["timings"]
    assert timings["aggregation_s"] >= timings["aggregate_s"] > 0 and "eval_after_s" in timings
    assert detail["losses"][0]["round"] == 0 and detail["losses"][1]["heldout"] < detail["losses"][0]["heldout"]
    assert len(detail["contributors"]) == 2 and all(c["accepted"] == 1 for c in detail["contributors"])


def test_home_summary_counts_active_runs():
    from training.selectors import home_summary

    assert home_summary() == {"runs_active": 0}
    services.run_start(proposal_id=approved_proposal().pk)
    assert home_summary() == {"runs_active": 1}


class TestPlayground:
    @pytest.fixture
    def model(self):
        return services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=1)

    def _post(self, client, **fields):
        data = {"model": "demo", "prompt": "def ", "max_new_tokens": 40, "temperature": 1.0, "top_k": 40, "seed": 0,
                **fields}
        return client.post("/playground/", data)

    def test_generates_text(self, client, member, model):
        client.force_login(member)
        html = self._post(client).content.decode()
        assert 'id="sample-text"' in html and "Output withheld" not in html

    def test_anonymous_visitors_are_asked_to_log_in(self, client, model):
        html = self._post(client).content.decode()
        assert "Log in</a> to generate" in html and 'id="sample-text"' not in html

    def test_output_guardrail_blocks_and_names_itself(self, client, member, model):
        client.force_login(member)
        from diloco.models import generate
        from training import blobs

        text = generate(blobs.checkpoint_model(model.current_checkpoint_id), b"def ", max_new_tokens=40,
                        temperature=1.0, top_k=40, seed=0).decode("utf-8", errors="replace")
        assert text.strip()
        assert 'id="sample-text"' in self._post(client).content.decode()  # the same sample, shown
        literal = "".join(f"\\x{{{ord(c):x}}}" for c in text[:8])  # its first characters, as RE2 escapes
        guardrail = GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="No byte soup",
                                     patterns=[literal], description="Blocks this very text.")
        html = self._post(client).content.decode()
        assert "Output withheld" in html and "No byte soup" in html
        assert f"guardrail #{guardrail.pk}" in html
        assert guardrail.proposal.get_absolute_url() in html
        assert 'id="sample-text"' not in html and text not in html

    def test_htmx_post_returns_only_the_result(self, client, member, model):
        client.force_login(member)
        response = client.post("/playground/", {"model": "demo", "prompt": "x", "max_new_tokens": 5,
                                                "temperature": 0, "seed": 0}, HTTP_HX_REQUEST="true")
        assert response.status_code == 200 and "<html" not in response.content.decode()

    def test_bad_input_is_reported(self, client, member, model):
        client.force_login(member)
        html = self._post(client, max_new_tokens=100000).content.decode()
        assert "errorlist" in html and 'id="sample-text"' not in html
