"""``agora-worker run --data-root``: the only folder a task's file: dataset may come from."""

from __future__ import annotations

import json

from tests.workers.test_cli import AgentProcess, agent_procs, cli  # noqa: F401 (agent_procs is a fixture)

CORPUS = "\n\n".join(f"document number {i}: some words to train on, more than a window long." for i in range(40))


def _file_task(serve_task, path):
    return serve_task(dataset={"source": f"file:{path}", "sha256": None, "heldout_fraction": 0.1,
                               "shard_index": 0, "shard_count": 2})


def test_without_a_data_root_a_file_task_fails_naming_the_source(fake_server, serve_task, worker_config, tmp_path,
                                                               agent_procs):  # noqa: F811
    corpus = tmp_path / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(CORPUS)
    task = _file_task(serve_task, corpus)
    agent = AgentProcess(worker_config.path, "--allow-cpu", "--once")
    agent_procs.append(agent)
    agent.wait(120)
    fail = fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/fail")
    assert len(fail) == 1, agent.output()
    assert f"'file:{corpus}' refused: file sources are not allowed here" in fail[0].json["reason"]
    assert fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/result") == []


def test_with_a_data_root_the_file_under_it_trains(fake_server, serve_task, worker_config, tmp_path,
                                                   agent_procs):  # noqa: F811
    root = tmp_path / "data"
    root.mkdir()
    (root / "corpus.txt").write_text(CORPUS)
    task = _file_task(serve_task, root / "corpus.txt")
    agent = AgentProcess(worker_config.path, "--allow-cpu", "--finish", "--data-root", str(root))
    agent_procs.append(agent)
    assert agent.wait(120) == 0, agent.output()
    result = fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/result")
    assert len(result) == 1 and json.loads(result[0].form["metrics"])["steps"] == task["inner"]["steps"]


def test_a_data_root_that_is_not_a_folder_is_refused(worker_config, tmp_path):
    result = cli(worker_config.path, "run", "--allow-cpu", "--once", "--data-root", str(tmp_path / "nope"))
    assert result.returncode == 1 and "is not a folder" in result.stderr
