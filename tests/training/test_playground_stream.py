"""The playground streams a version's sample as JSON lines, names the version, and never shows guarded text."""

import json

import pytest

from governance.models import Guardrail
from tests.governance.factories import GuardrailFactory
from training import services
from training.models import ModelVersion
from training.playground import HOLD_BACK_CHARS, sample_generate
from training.selectors import version_get

from .factories import TINY_CONFIG

pytestmark = pytest.mark.django_db
URL = "/playground/stream"


@pytest.fixture
def model():
    model = services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=1)
    other = services.community_model_ensure(slug="other", name="Other", arch="byte-gpt", config=TINY_CONFIG, seed=2)
    ModelVersion.objects.create(model=model, number=2, checkpoint=other.current_checkpoint, arch="byte-gpt",
                                config=TINY_CONFIG, parent=version_get(model=model, number=1), source="test")
    return model


def _events(response) -> list[dict]:
    assert response.status_code == 200 and response["Content-Type"] == "application/x-ndjson"
    return [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]


def _stream(client, **fields):
    data = {"model": "demo", "prompt": "def ", "max_new_tokens": 120, "temperature": 1.0, "top_k": 40,
            "top_p": 0.9, "seed": 3, **fields}
    return client.post(URL, data)


def test_the_stream_names_the_latest_version_and_sends_the_same_text_as_a_whole_sample(client, member, model):
    client.force_login(member)
    events = _events(_stream(client))
    assert events[0] == {"event": "start", "model": "demo", "version": 2,
                         "checkpoint": version_get(model=model).checkpoint_id}
    assert events[-1] == {"event": "done", "tokens": 120}
    chunks = [e["text"] for e in events if e["event"] == "text"]
    assert len(chunks) > 1  # streamed in pieces, not at the end
    whole = sample_generate(version=version_get(model=model), prompt="def ", max_new_tokens=120, temperature=1.0,
                            top_k=40, top_p=0.9, seed=3)
    assert "".join(chunks) == whole.text and whole.version == 2


def test_the_version_picker_samples_the_chosen_version(client, member, model):
    client.force_login(member)
    first = _events(_stream(client, version=1))
    latest = _events(_stream(client))
    assert first[0]["version"] == 1 and first[0]["checkpoint"] == version_get(model=model, number=1).checkpoint_id
    assert [e for e in first if e["event"] == "text"] != [e for e in latest if e["event"] == "text"]
    page = client.get("/playground/?model=demo").content.decode()
    assert "latest (v2)" in page and '<option value="1">v1' in page


@pytest.mark.parametrize(("fields", "field"), [
    ({"top_p": 2}, "top_p"), ({"top_k": 0}, "top_k"), ({"temperature": -1}, "temperature"),
    ({"max_new_tokens": 100_000}, "max_new_tokens"), ({"version": 99}, "version"), ({"model": "nope"}, "model"),
])
def test_bad_sampling_input_is_named(client, member, model, fields, field):
    client.force_login(member)
    response = _stream(client, **fields)
    assert response.status_code == 400
    assert field in response.json()["fields"]


def test_anonymous_visitors_cannot_generate(client, model):
    assert _stream(client).status_code == 401


def test_guarded_text_is_withheld_before_any_of_it_is_sent(client, member, model):
    client.force_login(member)
    whole = sample_generate(version=version_get(model=model), prompt="def ", max_new_tokens=200, temperature=1.0,
                            top_k=40, top_p=0.9, seed=3).text
    start = len(whole) // 2
    literal = "".join(f"\\x{{{ord(c):x}}}" for c in whole[start:start + 6])
    guardrail = GuardrailFactory(kind=Guardrail.Kind.OUTPUT_FILTER, title="Mid-text", patterns=[literal])
    events = _events(_stream(client, max_new_tokens=200))
    assert events[-1]["event"] == "withheld" and events[-1]["guardrail"]["id"] == guardrail.pk
    assert events[-1]["url"] == guardrail.get_absolute_url()
    sent = "".join(e["text"] for e in events if e["event"] == "text")
    first_match = whole.find(whole[start:start + 6])
    assert len(sent) <= first_match and len(sent) >= first_match - HOLD_BACK_CHARS - 8
