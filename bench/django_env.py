"""Set up Django on a throwaway test database for a benchmark, and tear it down afterwards."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def throwaway_database(verbosity: int = 0):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agora.settings")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret")
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_test_environment, teardown_test_environment

    setup_test_environment()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=verbosity, autoclobber=True, keepdb=False)
    try:
        yield connection
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=verbosity)
        teardown_test_environment()
