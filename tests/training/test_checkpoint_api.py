import hashlib

import pytest

from diloco.checkpoint import load_weights
from training import services

from .factories import TINY_CONFIG

pytestmark = pytest.mark.django_db


def test_checkpoint_download_is_content_addressed_and_immutable(client):
    model = services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=3)
    sha = model.current_checkpoint_id
    response = client.get(f"/api/v1/checkpoints/{sha}")
    assert response.status_code == 200
    data = b"".join(response.streaming_content)
    assert hashlib.sha256(data).hexdigest() == sha
    assert response["ETag"] == f'"{sha}"'
    assert response["Cache-Control"] == "public, max-age=31536000, immutable"
    assert int(response["Content-Length"]) == len(data) == model.current_checkpoint.size
    state, meta = load_weights(data)
    assert meta["arch"] == "byte-gpt" and meta["config"] == TINY_CONFIG

    cached = client.get(f"/api/v1/checkpoints/{sha}", HTTP_IF_NONE_MATCH=f'"{sha}"')
    assert cached.status_code == 304 and cached["ETag"] == f'"{sha}"'
    assert client.get(f"/api/v1/checkpoints/{'0' * 64}").status_code == 404


def test_same_weights_same_checkpoint(checkpoint_storage):
    a = services.community_model_ensure(slug="a", name="A", arch="byte-gpt", config=TINY_CONFIG, seed=5)
    b = services.community_model_ensure(slug="b", name="B", arch="byte-gpt", config=TINY_CONFIG, seed=6)
    assert a.current_checkpoint_id != b.current_checkpoint_id
    files = [p for p in checkpoint_storage.rglob("*.safetensors")]
    assert sorted(p.stem for p in files) == sorted([a.current_checkpoint_id, b.current_checkpoint_id])
    assert all(p.parent.name == p.stem[:2] for p in files)
