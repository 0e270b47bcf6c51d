import boto3
import pytest
from moto import mock_aws
from rest_framework.test import APIClient

from tests.marketplace.factories import WorkerFactory, bearer
from training import blobs


@pytest.fixture(autouse=True)
def checkpoint_storage(settings, tmp_path):
    """Every test gets its own blob store, so "nothing stored" can be checked by listing it."""
    root = tmp_path / "blobs"
    settings.STORAGES = {**settings.STORAGES, "checkpoints": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(root)}}}
    blobs.clear_caches()
    yield root
    blobs.clear_caches()


@pytest.fixture(autouse=True)
def enqueued(monkeypatch):
    """Round checks the services enqueue after commit, recorded instead of sent to a broker."""
    calls: list[int] = []
    monkeypatch.setattr("training.services.assignment._enqueue_round_check", calls.append)
    return calls


def stored_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def cpu_worker(member):
    return WorkerFactory(owner=member, gpus=[], cuda_version="")


@pytest.fixture
def gpu_worker(other_member):
    return WorkerFactory(owner=other_member, gpus=[{"name": "RTX 4090", "memory_mb": 24576}])


def client_for(worker) -> APIClient:
    client = APIClient()
    client.credentials(**bearer(worker))
    return client


S3_BUCKET = "agora-checkpoints-test"


@pytest.fixture
def s3(settings, monkeypatch):
    """Checkpoint storage on an in-process S3 (moto) bucket; yields the boto3 client to inspect it."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=S3_BUCKET)
        settings.STORAGES = {**settings.STORAGES, "checkpoints": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {"bucket_name": S3_BUCKET, "file_overwrite": False, "region_name": "us-east-1"}}}
        blobs.clear_caches()
        yield client
        blobs.clear_caches()
