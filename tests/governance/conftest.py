"""Fixtures of the governance tests."""

import pytest


@pytest.fixture
def logged_in(client, member):
    """The browser client, signed in as ``member``."""
    client.force_login(member)
    return client
