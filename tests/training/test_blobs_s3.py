"""On S3-compatible storage (moto) blobs are checked against their sha256 as on local disk: a damaged
content-addressed object is replaced when written again and never served."""

from __future__ import annotations

import hashlib

import pytest

from training import blobs, services
from training.models import checkpoint_storage_name

from .conftest import S3_BUCKET
from .factories import TINY_CONFIG

pytestmark = pytest.mark.django_db
BUCKET = S3_BUCKET  # the s3 fixture's (conftest)
DATA = b"weights " * 1024
SHA = hashlib.sha256(DATA).hexdigest()
NAME = checkpoint_storage_name(SHA)




def _object(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _keys(client) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_a_damaged_content_addressed_object_is_replaced(s3):
    s3.put_object(Bucket=BUCKET, Key=NAME, Body=DATA[:100])
    blobs.blob_write(NAME, DATA, content_addressed=True, sha256=SHA)
    assert _object(s3, NAME) == DATA
    assert _keys(s3) == [NAME]


def test_a_write_that_does_not_match_its_sha256_leaves_no_object(s3):
    with pytest.raises(blobs.BlobCorrupt):
        blobs.blob_write("updates/task-1.safetensors", DATA, sha256="0" * 64)
    assert _keys(s3) == []


def test_no_temporary_objects_to_sweep_on_s3(s3):
    blobs.blob_write(NAME, DATA, content_addressed=True)
    assert blobs.blob_sweep_temp(older_than_s=0) == []
    assert _keys(s3) == [NAME]


def test_a_damaged_or_missing_checkpoint_object_is_not_served(s3, client):
    model = services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=3)
    sha = model.current_checkpoint_id
    key = checkpoint_storage_name(sha)
    good = _object(s3, key)

    response = client.get(f"/api/v1/checkpoints/{sha}")
    assert response.status_code == 200 and int(response["Content-Length"]) == len(good)
    assert b"".join(response.streaming_content) == good

    for damaged in (good[:-1] + bytes([good[-1] ^ 1]), good[:-10]):  # same length, then shorter
        s3.put_object(Bucket=BUCKET, Key=key, Body=damaged)
        response = client.get(f"/api/v1/checkpoints/{sha}")
        assert response.status_code == 409 and response.json()["error"] == "checkpoint_corrupt"

    s3.delete_object(Bucket=BUCKET, Key=key)
    response = client.get(f"/api/v1/checkpoints/{sha}")
    assert response.status_code == 409 and response.json()["error"] == "checkpoint_missing"
