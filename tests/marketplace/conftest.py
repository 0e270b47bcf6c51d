import pytest
from rest_framework.test import APIClient

from tests.marketplace.factories import WorkerFactory, bearer


@pytest.fixture
def worker(member):
    return WorkerFactory(owner=member)


@pytest.fixture
def other_worker(other_member):
    return WorkerFactory(owner=other_member)


@pytest.fixture
def worker_client(worker):
    client = APIClient()
    client.credentials(**bearer(worker))
    return client


@pytest.fixture
def high_rates(settings):
    """Lift the rate limits for tests that send many requests (the rate tests set their own)."""
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "enroll": "10000/min", "heartbeat": "10000/min"}}
    return settings




@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Every factory user gets a password; the default hasher is slow on purpose, which tests do not need."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
