"""The spec's dataset format and tokenizer: clear field errors, and the same bounds as diloco's."""

import pytest
from rest_framework.exceptions import ValidationError

from diloco import data, tokenization
from governance import specs
from governance.specs import spec_normalise


def errors(spec):
    with pytest.raises(ValidationError) as info:
        spec_normalise(kind="training", spec=spec)
    return info.value.detail["spec"]


def test_defaults_keep_todays_byte_level_text_runs():
    spec = spec_normalise(kind="training", spec={})
    assert spec["dataset"]["format"] == "text" and spec["dataset"]["field"] is None
    assert spec["tokenizer"] == {"kind": "byte", "vocab_size": None}


def test_governance_copies_diloco_bounds():
    assert specs.DATASET_FORMATS == data.DATASET_FORMATS
    assert (specs.MIN_BPE_VOCAB, specs.MAX_BPE_VOCAB) == (tokenization.MIN_BPE_VOCAB, tokenization.MAX_BPE_VOCAB)


def test_format_needs_its_field_and_only_its_field(settings, tmp_path):
    settings.AGORA_DATA_ROOT = tmp_path
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    source = f"file:{tmp_path}/d.jsonl"
    assert "field" in errors({"dataset": {"source": source, "format": "jsonl"}})["dataset"]
    assert "column" in errors({"dataset": {"source": source, "format": "parquet"}})["dataset"]
    assert "column" in errors({"dataset": {"source": source, "format": "jsonl", "field": "t", "column": "t"}})["dataset"]
    assert "format" in errors({"dataset": {"format": "jsonl", "field": "text"}})["dataset"]  # builtin is text
    assert "format" in errors({"dataset": {"source": source, "format": "csv"}})["dataset"]
    ok = spec_normalise(kind="training", spec={"dataset": {"source": source, "format": "jsonl", "field": "text"}})
    assert ok["dataset"]["field"] == "text"


def test_tokenizer_fields_are_checked():
    assert "vocab_size" in errors({"tokenizer": {"kind": "bpe"}})["tokenizer"]
    assert "vocab_size" in errors({"tokenizer": {"kind": "byte", "vocab_size": 512}})["tokenizer"]
    assert "vocab_size" in errors({"tokenizer": {"kind": "bpe", "vocab_size": 100_000}})["tokenizer"]
    assert "kind" in errors({"tokenizer": {"kind": "sentencepiece"}})["tokenizer"]


def test_byte_gpt_reads_only_bytes():
    detail = errors({"tokenizer": {"kind": "bpe", "vocab_size": 512}})["tokenizer"]
    assert "byte-gpt reads bytes" in str(detail["kind"][0])


@pytest.mark.django_db
def test_the_web_form_proposes_a_jsonl_dataset_and_puts_errors_on_the_field(client, member, settings, tmp_path):
    from governance.models import Proposal

    settings.AGORA_DATA_ROOT = tmp_path
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    client.force_login(member)
    page = client.get("/proposals/new/?kind=training").content.decode()
    assert 'name="dataset_format"' in page and 'name="dataset_field"' in page
    base = {"kind": "training", "title": "Train on notes", "open_now": "on", "dataset_source": f"file:{tmp_path}/d.jsonl",
            "dataset_format": "jsonl", "allow_cpu": "on"}
    form = client.post("/proposals/new/", base)
    assert form.status_code == 400 and 'id="id_dataset_field-errors"' in form.content.decode()
    assert not Proposal.objects.exists()
    assert client.post("/proposals/new/", {**base, "dataset_field": "text"}).status_code == 302
    assert Proposal.objects.get().spec["dataset"] | {"source": None} == {
        "source": None, "sha256": None, "heldout_fraction": 0.1, "format": "jsonl", "field": "text", "column": None}
