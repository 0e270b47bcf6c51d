"""Checkpoints, updates and outer states on S3-compatible storage (django-storages), against moto's S3."""

import pytest
from rest_framework.test import APIClient, APIRequestFactory

from diloco.checkpoint import load_weights
from tests.marketplace.factories import WorkerFactory
from training import blobs, services
from training.models import Round, checkpoint_storage_name
from training.serializers import task_payload

from .conftest import S3_BUCKET
from .factories import approved_proposal, train_update

pytestmark = pytest.mark.django_db
BUCKET = S3_BUCKET  # the s3 fixture's (conftest)




def _keys(client) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_a_round_runs_on_s3_and_checkpoints_download_from_it(s3):
    run = services.run_start(proposal_id=approved_proposal(diloco={"workers_per_round": 1, "rounds": 2}).pk)
    assert _keys(s3) == [checkpoint_storage_name(run.base_checkpoint_id)]

    worker = WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    data, metrics = train_update(task_payload(task, request=APIRequestFactory().get("/"), guardrails=[],
                                              max_upload_bytes=0))
    services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
    blobs.clear_caches()  # make the aggregation read everything back from S3
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run, index=1).pk)

    assert rnd.accepted, rnd.reason
    run.refresh_from_db()
    keys = _keys(s3)
    assert checkpoint_storage_name(rnd.checkpoint_out_id) in keys
    assert run.outer_state_name in keys
    assert any(k.startswith(f"updates/run-{run.pk}/") for k in keys)

    response = APIClient().get(f"/api/v1/checkpoints/{rnd.checkpoint_out_id}")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    assert body == s3.get_object(Bucket=BUCKET, Key=checkpoint_storage_name(rnd.checkpoint_out_id))["Body"].read()
    assert load_weights(body)[1]["round"] == 1
    assert response["ETag"] == f'"{rnd.checkpoint_out_id}"'


def test_rewriting_a_content_addressed_blob_keeps_one_copy(s3):
    blobs.blob_write("ab/same.safetensors", b"same bytes", content_addressed=True)
    blobs.blob_write("ab/same.safetensors", b"same bytes", content_addressed=True)
    assert _keys(s3) == ["ab/same.safetensors"]
    blobs.blob_delete("ab/same.safetensors")
    assert _keys(s3) == []
