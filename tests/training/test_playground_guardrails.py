"""The playground applies output guardrails on RE2: hostile patterns cannot pin a web worker, and a stored
guardrail RE2 cannot compile withholds the output (fail closed) instead of crashing the page."""

import pytest
from django.utils import timezone

from diloco.guardrails import compile_patterns
from governance.models import Guardrail
from tests.governance.factories import GuardrailFactory
from training import services

from .factories import TINY_CONFIG

pytestmark = pytest.mark.django_db


@pytest.fixture
def model():
    return services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=1)


def _post(client, **fields):
    data = {"model": "demo", "prompt": "def ", "max_new_tokens": 20, "temperature": 1.0, "seed": 0, **fields}
    return client.post("/playground/", data)


def test_a_catastrophic_pattern_on_an_adversarial_prompt_answers(client, member, model):
    client.force_login(member)
    guardrail = GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Runs of a",
                                 patterns=["(a+)+$", "(x+x+)+y", "^(a|aa)+b"])
    assert type(compile_patterns(tuple(guardrail.patterns))).__module__.startswith("re2")
    # 2**499 paths for a backtracking engine; RE2 reads the text once.
    response = _post(client, prompt="a" * 499 + "!", max_new_tokens=1, temperature=0)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="sample-text"' in html or "Output withheld" in html


def test_the_matching_pattern_still_blocks(client, member, model):
    client.force_login(member)
    GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Nested runs", patterns=["^(.+)+$"])
    html = _post(client, prompt="aaaa").content.decode()
    assert "Output withheld" in html and "Nested runs" in html and 'id="sample-text"' not in html


def test_output_guardrails_judge_the_generated_text_not_the_prompt(client, member, model):
    client.force_login(member)
    GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Prompt words", patterns=["zqxjzqxj"])
    html = _post(client, prompt="zqxjzqxj ", temperature=0).content.decode()
    assert 'id="sample-text"' in html and "Output withheld" not in html


def test_a_stored_pattern_re2_cannot_compile_withholds_output_and_names_the_guardrail(
        client, member, model, monkeypatch):
    client.force_login(member)
    GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Fine", patterns=["zzzz"])
    legacy = GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Legacy lookahead",
                              patterns=["ok", "foo(?=bar)"])
    GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Retired backref", patterns=[r"(a)\1"], active=False,
                     retired_at=timezone.now())
    GuardrailFactory(kind=Guardrail.Kind.DATA_FILTER, title="Data backref", patterns=[r"(b)\1"])  # not for output

    def no_generation(*args, **kwargs):
        raise AssertionError("nothing is generated while a guardrail cannot be enforced")

    monkeypatch.setattr("training.playground.generate_tokens", no_generation)
    response = _post(client)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Output withheld" in html and "Legacy lookahead" in html and f"guardrail #{legacy.pk}" in html
    assert "cannot be enforced" in html and "invalid perl operator" in html
    assert 'id="sample-text"' not in html
    assert client.get("/guardrails/").status_code == 200
    assert client.get("/api/v1/guardrails/").status_code == 200


def test_retiring_the_bad_guardrail_restores_the_playground(client, member, model):
    client.force_login(member)
    GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Legacy", patterns=["(?<=x)y"], active=False,
                     retired_at=timezone.now())
    html = _post(client).content.decode()
    assert 'id="sample-text"' in html
