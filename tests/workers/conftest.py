"""Fixtures for the agent's tests: a fake protocol server, an enrolled config in a temporary directory, and a
real (tiny) task with its checkpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.workers.fakeserver import FakeServer
from workers import config as cfgmod

TINY_MODEL = {"arch": "byte-gpt", "config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}}


@pytest.fixture
def fake_server():
    server = FakeServer().start()
    yield server
    server.stop()


@pytest.fixture
def worker_config(tmp_path, fake_server) -> cfgmod.WorkerConfig:
    config = cfgmod.WorkerConfig(server=fake_server.url, worker_id=7, worker_token="wkr_secret", name="box",
                                 path=tmp_path / "agora" / "worker.json")
    cfgmod.save_config(config)
    return config


def future(seconds: float = 3600) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def make_task(task_id: int = 17, *, checkpoint_sha256: str = "0" * 64, steps: int = 3, **overrides) -> dict:
    task = {
        "id": task_id, "run_id": 4, "round": 1, "checkpoint_sha256": checkpoint_sha256,
        "checkpoint_url": f"/api/v1/checkpoints/{checkpoint_sha256}",
        "model": TINY_MODEL,
        "dataset": {"source": "builtin:python-docs", "sha256": None, "heldout_fraction": 0.1, "shard_index": 0,
                    "shard_count": 2},
        "inner": {"steps": steps, "lr": 0.001, "batch_size": 2, "seq_len": 16, "weight_decay": 0.1, "warmup": 1,
                  "grad_clip": 1.0},
        "compression": "int8", "guardrails": [], "seed": 5, "deadline": future(), "max_upload_bytes": 10_000_000,
    }
    task.update(overrides)
    return task


@pytest.fixture(scope="session")
def tiny_checkpoint() -> tuple[bytes, str, dict]:
    """(bytes, sha256, state) of a fresh tiny byte-GPT checkpoint made with diloco."""
    from diloco.checkpoint import save_weights, sha256_hex
    from diloco.models import init_state

    state = init_state(TINY_MODEL["arch"], TINY_MODEL["config"], seed=1)
    data = save_weights(state, {"arch": TINY_MODEL["arch"], "config": TINY_MODEL["config"]})
    return data, sha256_hex(data), state


@pytest.fixture
def serve_task(fake_server, tiny_checkpoint):
    """Serve one real task (claimed once, then 204) and its checkpoint; returns the task."""

    def serve(**overrides) -> dict:
        data, sha, _ = tiny_checkpoint
        task = make_task(checkpoint_sha256=sha, **overrides)
        handed = []

        def claim(_req):
            if handed:
                return 204, None
            handed.append(True)
            return 200, task

        fake_server.on("POST", "/api/v1/tasks/claim", claim)
        fake_server.on("GET", f"/api/v1/checkpoints/{sha}", (200, data))
        fake_server.on("POST", f"/api/v1/tasks/{task['id']}/result", (202, {"accepted_for_aggregation": True}))
        fake_server.on("POST", f"/api/v1/tasks/{task['id']}/fail", (200, {}))
        return task

    return serve
