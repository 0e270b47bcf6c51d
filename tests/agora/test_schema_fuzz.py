"""The OpenAPI schema is exact: schemathesis generates requests for every operation from the live server's
``/api/schema/`` and sends them as an anonymous visitor, a member (API token) and a worker (worker token).
No answer may be a 5xx, every status code must be documented for its operation, and every body and
content type must match the schema.

Throttle rates are raised for the run (429 is documented where a view throttles, and tested elsewhere):
at the default rates most generated requests would only ever see the throttle."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token

from governance.models import Proposal
from tests.factories import UserFactory
from tests.governance.factories import ProposalFactory
from tests.marketplace.factories import WorkerFactory
from tests.training.factories import approved_proposal
from training import blobs, services

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

EXAMPLES_PER_OPERATION_AND_ROLE = 13  # 29 operations x 3 roles x 13 > 1,000 requests
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance")


@pytest.fixture
def world(settings, tmp_path, monkeypatch):
    """A member, a worker (of another member, so the member cannot revoke it), a running run with a
    checkpoint and a task the worker holds, and proposals in several states (one a draft of the member's):
    generated ids 1, 2, ... find real objects."""
    settings.STORAGES = {**settings.STORAGES, "checkpoints": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "blobs")}}}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        scope: "100000/min" for scope in settings.REST_FRAMEWORK.get("DEFAULT_THROTTLE_RATES", {})}}
    monkeypatch.setattr("training.tasks.enqueue", lambda task, *args: True)  # no broker in this test
    blobs.clear_caches()
    member = UserFactory()
    worker = WorkerFactory(owner=UserFactory(), gpus=[], cuda_version="")
    run = services.run_start(proposal_id=approved_proposal().pk)
    task = services.task_claim(worker=worker)
    for status in (Proposal.Status.ACTIVE, Proposal.Status.SUCCEEDED, Proposal.Status.DRAFT):
        ProposalFactory(status=status)
    ProposalFactory(status=Proposal.Status.DRAFT, author=member)
    yield {
        "anonymous": {},
        "member": {"Authorization": f"Token {Token.objects.create(user=member).key}"},
        "worker": {"Authorization": f"Bearer {worker.plain_token}"},
        # Ids of real objects by path parameter: a share of the generated requests uses them, so they reach
        # the services instead of stopping at 404.
        "known": {"id": sorted({*Proposal.objects.values_list("pk", flat=True), run.pk}),
                  "worker_id": [worker.pk], "task_id": [task.pk], "sha256": [run.base_checkpoint.sha256]},
    }
    blobs.clear_caches()


def _checks():
    import schemathesis.checks as registry

    return [getattr(registry, name) for name in CHECKS]


class Fuzz:
    """Sends generated cases and records what came back; failures are collected so one run reports all."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.session = requests.Session()
        self.checks = _checks()
        self.sent: Counter = Counter()
        self.statuses: Counter = Counter()
        self.by_role: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[str] = []

    def run(self, operation, role: str, headers: dict, known: dict[str, list]) -> None:
        strategies = [operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)]
        names = re.findall(r"{(\w+)}", operation.path)
        if names and all(name in known for name in names):
            strategies += [operation.as_strategy(schemathesis.GenerationMode.POSITIVE, path_parameters={name: value})
                           for name in names for value in known[name]]
        strategy = st.one_of(strategies)

        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION_AND_ROLE, deadline=None, database=None,
                             derandomize=True, phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def exercise(case):
            response = case.call(base_url=self.base_url, session=self.session, headers=headers, timeout=30)
            self.sent[operation.label] += 1
            self.statuses[response.status_code] += 1
            self.by_role[role][response.status_code // 100] += 1
            try:
                case.validate_response(response, checks=self.checks, headers=headers)
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a group of failures
                for failure in getattr(exc, "exceptions", None) or [exc]:
                    first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
                    self.failures.append(f"{role} {operation.label} -> {response.status_code}: {first[:300]}\n"
                                         f"    {response.text[:300]}")

        exercise()


def test_every_operation_answers_as_documented(live_server, world):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/?format=json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    fuzz = Fuzz(live_server.url)
    for operation in operations:
        for role in ("anonymous", "member", "worker"):
            fuzz.run(operation, role, world[role], world["known"])

    total = sum(fuzz.sent.values())
    print(f"\n{total} requests over {len(fuzz.sent)} operations; statuses {dict(sorted(fuzz.statuses.items()))}")
    assert not fuzz.failures, f"{len(fuzz.failures)} failures:\n" + "\n".join(sorted(set(fuzz.failures))[:40])
    assert total >= 1000
    assert set(fuzz.sent) == {operation.label for operation in operations}
    # Not only refusals: every role also got answers that went through (reads, its own writes).
    assert all(fuzz.by_role[role][2] and fuzz.by_role[role][4] for role in ("anonymous", "member", "worker"))
