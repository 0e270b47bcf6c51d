"""Settings come from the environment: the embedded default with nothing set, services when set."""

import os
import subprocess
import sys

SNIPPET = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps([s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL, s.CACHES['default']['BACKEND'], s.DEBUG]))"
)


def _settings_with(env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env.update(DJANGO_SETTINGS_MODULE="agora.settings", **env_overrides)
    run = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True)
    return run


def test_embedded_default_with_nothing_set(tmp_path):
    run = _settings_with({"DJANGO_SECRET_KEY": "x", "AGORA_VAR_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert '"django.db.backends.sqlite3", "filesystem://"' in run.stdout
    assert "FileBasedCache" in run.stdout


def test_postgres_and_redis_when_set(tmp_path):
    run = _settings_with({
        "DJANGO_SECRET_KEY": "x", "AGORA_VAR_DIR": str(tmp_path),
        "DATABASE_URL": "postgres://u@db:5432/agora", "REDIS_URL": "redis://cache:6379/0",
    })
    assert run.returncode == 0, run.stderr
    assert "postgresql" in run.stdout and "redis://cache:6379/0" in run.stdout and "RedisCache" in run.stdout


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    env = {"AGORA_VAR_DIR": str(tmp_path), "DJANGO_DEBUG": "0"}
    saved = os.environ.pop("DJANGO_SECRET_KEY", None)
    try:
        run = _settings_with(env)
    finally:
        if saved is not None:
            os.environ["DJANGO_SECRET_KEY"] = saved
    assert run.returncode != 0
    assert "DJANGO_SECRET_KEY" in run.stderr


def test_read_only_commands_need_no_secret_key(tmp_path):
    """`python manage.py verify_ledger` from the README works in a shell without the production secret."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY",
                                                          "DJANGO_DEBUG")}
    env.update(AGORA_VAR_DIR=str(tmp_path), DJANGO_DEBUG="0")
    manage = os.path.join(os.path.dirname(__file__), "..", "..", "manage.py")
    subprocess.run([sys.executable, manage, "migrate", "--noinput"], env={**env, "DJANGO_SECRET_KEY": "x"},
                   capture_output=True, text=True, check=True)
    run = subprocess.run([sys.executable, manage, "verify_ledger"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout.lower() or "intact" in run.stdout.lower(), run.stdout
    served = subprocess.run([sys.executable, manage, "check"], env=env, capture_output=True, text=True)
    assert served.returncode != 0 and "DJANGO_SECRET_KEY" in served.stderr, "anything else still needs the secret"
