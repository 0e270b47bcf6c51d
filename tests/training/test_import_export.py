"""Importing a Hugging Face directory as a model version, and exporting versions as loadable directories."""

import hashlib
import io
import json
import tarfile

import pytest
import torch
from django.core.management import CommandError, call_command

from diloco.tokenization import train_bpe
from ledger.models import Entry
from training import services
from training.models import CommunityModel, ModelVersion

from .factories import TINY_CONFIG

pytestmark = pytest.mark.django_db
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]


def save_tiny_llama(directory, *, seed=0, **overrides):
    """A tiny Llama directory as ``save_pretrained`` writes it, with a BPE tokenizer.json; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe(TEXTS, 300)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, vocab_size=300,
                         tie_word_embeddings=False, **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_bytes(tokenizer)
    return model


def _bpe_ids(tokenizer_json: bytes, text: str) -> list[int]:
    from diloco.tokenization import load_tokenizer

    return load_tokenizer(tokenizer_json).encode(text)


def _bpe_decode(tokenizer_json: bytes, ids: list[int]) -> str:
    from diloco.tokenization import load_tokenizer

    return load_tokenizer(tokenizer_json).decode(ids)


def _untar(data: bytes, into):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    return names


def test_import_model_stores_version_1_with_its_tokenizer_and_exports_a_directory_that_loads(tmp_path, client):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "tiny-llama"
    original = save_tiny_llama(source)
    out = io.StringIO()
    call_command("import_model", str(source), "--slug", "tiny-llama", stdout=out)
    assert "imported tiny-llama v1: llama" in out.getvalue()

    version = ModelVersion.objects.get(model__slug="tiny-llama")
    tokenizer_json = (source / "tokenizer.json").read_bytes()
    assert version.number == 1 and version.arch == "llama" and version.config["hidden_size"] == 32
    assert version.tokenizer_sha256 == hashlib.sha256(tokenizer_json).hexdigest()
    entry = Entry.objects.get(action="model.imported")
    assert entry.payload["version"] == 1 and entry.payload["checkpoint"] == version.checkpoint_id
    assert entry.payload["tokenizer_sha256"] == version.tokenizer_sha256 and entry.payload["parameters"] > 0

    from training.playground import sample_generate

    sample = sample_generate(version=version, prompt="def f3(x):", max_new_tokens=12, temperature=0)
    ids = original.generate(torch.tensor([_bpe_ids(tokenizer_json, "def f3(x):")]), max_new_tokens=12,
                            do_sample=False)[0, -12:].tolist()  # greedy, by the imported model itself
    assert sample.version == 1 and sample.text == _bpe_decode(tokenizer_json, ids)

    response = client.get("/models/tiny-llama/v1.tar.gz")  # public, like the checkpoints
    assert response.status_code == 200 and response["Content-Type"] == "application/gzip"
    assert 'filename="tiny-llama-v1.tar.gz"' in response["Content-Disposition"]
    data = b"".join(response.streaming_content)
    names = _untar(data, tmp_path / "export")
    folder = tmp_path / "export" / "tiny-llama-v1"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        n.split("/", 1)[1] for n in names}
    assert b"".join(client.get("/models/tiny-llama/v1.tar.gz").streaming_content) == data  # the same bytes

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    idx = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        assert torch.allclose(loaded(idx).logits, original(idx).logits, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("def f3(x):", return_tensors="pt").input_ids
    generated = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5

    card = (folder / "README.md").read_text()
    safetensors_sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert safetensors_sha in card and "tiny-llama" in card and "Ledger entries" in card
    assert f"{entry.seq}" in card.split("Ledger entries", 1)[1]


def test_importing_again_adds_the_next_version(tmp_path):
    save_tiny_llama(tmp_path / "a", seed=0)
    save_tiny_llama(tmp_path / "b", seed=1)
    first = services.model_import(directory=tmp_path / "a", slug="tiny-llama")
    second = services.model_import(directory=tmp_path / "b", slug="tiny-llama")
    assert (first.number, second.number, second.parent) == (1, 2, first)
    assert CommunityModel.objects.get(slug="tiny-llama").current_checkpoint_id == second.checkpoint_id


@pytest.mark.parametrize(("breakage", "message"), [
    ("model_type", "not supported"),
    ("no_tokenizer", "tokenizer.json"),
    ("bad_tokenizer", "tokenizer.json"),
    ("shape", "shape"),
    ("too_big", "AGORA_MAX_MODEL_PARAMS"),
])
def test_a_bad_directory_is_refused_with_the_reason_and_nothing_is_stored(tmp_path, settings, breakage, message):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "bad"
    save_tiny_llama(source)
    config = json.loads((source / "config.json").read_text())
    if breakage == "model_type":
        config["model_type"] = "bert"
        (source / "config.json").write_text(json.dumps(config))
    elif breakage == "no_tokenizer":
        (source / "tokenizer.json").unlink()
    elif breakage == "bad_tokenizer":
        (source / "tokenizer.json").write_text('{"model": "nope"}')
    elif breakage == "shape":
        state = load_file(source / "model.safetensors")
        state["model.embed_tokens.weight"] = torch.zeros(300, 31)
        save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    else:
        settings.AGORA_MAX_MODEL_PARAMS = 1000
    with pytest.raises(CommandError) as info:
        call_command("import_model", str(source), "--slug", "bad")
    assert message in str(info.value)
    assert not CommunityModel.objects.exists() and not ModelVersion.objects.exists()
    assert not Entry.objects.exists()


def test_the_staff_page_imports_from_under_the_data_root_only(tmp_path, settings, client, member, staff):
    settings.AGORA_DATA_ROOT = tmp_path / "data"
    save_tiny_llama(tmp_path / "data" / "models" / "tiny")
    save_tiny_llama(tmp_path / "elsewhere")
    client.force_login(member)
    assert client.get("/models/import").status_code == 403
    assert client.post("/models/import", {"directory": "models/tiny", "slug": "tiny"}).status_code == 403
    client.force_login(staff)
    outside = client.post("/models/import", {"directory": str(tmp_path / "elsewhere"), "slug": "tiny"})
    assert outside.status_code == 200 and "under the data root" in outside.content.decode()
    bad_slug = client.post("/models/import", {"directory": "models/tiny", "slug": "Not a slug"})
    assert bad_slug.status_code == 200 and not ModelVersion.objects.exists()
    response = client.post("/models/import", {"directory": "models/tiny", "slug": "tiny", "name": "Tiny Llama"})
    assert response.status_code == 302 and response["Location"] == "/models/tiny/"
    assert ModelVersion.objects.get().model.name == "Tiny Llama"
    assert Entry.objects.get(action="model.imported").actor == staff.get_username()


def test_a_byte_level_version_exports_as_gpt2_with_a_byte_tokenizer(tmp_path, client):
    from transformers import AutoModelForCausalLM

    from diloco.models import model_with_weights
    from training import blobs

    model = services.community_model_ensure(slug="tiny-gpt", name="Tiny", arch="byte-gpt", config=TINY_CONFIG, seed=3)
    data = b"".join(client.get("/models/tiny-gpt/v1.tar.gz").streaming_content)
    _untar(data, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-gpt-v1").eval()
    ours = model_with_weights("byte-gpt", TINY_CONFIG, blobs.checkpoint_state(model.current_checkpoint_id)[0]).eval()
    idx = torch.tensor([list(b"def f(x):")])
    with torch.no_grad():
        assert torch.allclose(loaded(idx).logits, ours(idx), atol=1e-4)


def test_a_missing_version_is_404(client):
    assert client.get("/models/nope/v1.tar.gz").status_code == 404
