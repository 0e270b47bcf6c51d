"""Shared fixtures: users, API clients, and real processes (Celery, agents) for integration tests."""

from __future__ import annotations

import os

import pytest
from django.conf import settings
from django.core.cache import cache

from tests.factories import UserFactory

REQUIRE_SERVICES = os.environ.get("AGORA_REQUIRE_SERVICES") == "1"


def pytest_sessionstart(session):
    if REQUIRE_SERVICES:
        assert os.environ.get("DATABASE_URL", "").startswith("postgres"), "CI requires DATABASE_URL (PostgreSQL)"
        assert os.environ.get("REDIS_URL"), "CI requires REDIS_URL"


@pytest.fixture(scope="session", autouse=True)
def _close_stray_connections(django_db_setup, django_db_blocker):
    """Live-server threads and killed child processes can leave sessions open on the test database;
    close them so pytest-django can drop it at the end."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


@pytest.fixture(autouse=True)
def _clear_cache():
    """Throttles and worker presence live in the cache; every test starts from an empty one.

    On Redis only this suite's keys go (its own prefix): `cache.clear()` would FLUSHDB a database that
    other programs on the machine may share."""
    _cache_clear_own_keys()
    yield


def _cache_clear_own_keys() -> None:
    backend = settings.CACHES["default"]["BACKEND"]
    if not backend.endswith("RedisCache"):
        cache.clear()
        return
    client = cache._cache.get_client(write=True)
    pattern = cache.make_key("*")
    batch = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # The default PBKDF2 hasher costs ~0.3 s per user; the permission matrices create hundreds.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def member(db):
    return UserFactory()


@pytest.fixture
def other_member(db):
    return UserFactory()


@pytest.fixture
def staff(db):
    return UserFactory(is_staff=True)


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def member_client(member):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(member)
    return client


@pytest.fixture
def staff_client(staff):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(staff)
    return client


@pytest.fixture
def process_env(transactional_db, live_server):
    """Environment for child processes (Celery, agents, manage.py) that must see the test database."""
    from tests.procs import child_env

    return child_env(live_server.url)


@pytest.fixture
def redis_required():
    if not settings.REDIS_URL:
        if REQUIRE_SERVICES:
            pytest.fail("REDIS_URL is required")
        pytest.skip("needs REDIS_URL")
