"""A volunteer follows "Add a worker" literally, in a fresh virtual environment with no checkout, in Chromium.

The commands are read from the page and run in a shell whose home is a temporary folder: the agent's
wheel comes from the live server, its dependencies from the package index. One step is added, because
this machine has neither a GPU nor the internet: PyTorch is installed first from the machine's own index,
as a volunteer's GPU box already has its CUDA build (the page says the agent keeps the one it finds).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from django.conf import settings

from tests.factories import UserFactory
from tests.procs import Proc, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
CHROMIUM = os.environ.get("AGORA_CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery"
SHOTS = Path(os.environ.get("AGORA_SCREENSHOTS", str(Path(settings.VAR_DIR) / "screenshots")))
TORCH = "torch==2.13.0"  # what this machine's index serves (the CPU build); a GPU box has its CUDA one


@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        if os.environ.get("AGORA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"Chromium is required but missing at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"])
        yield browser
        browser.close()


def _shell(script: str, home: Path, log: Path, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "DJANGO", "AGORA"))}
    env.update(HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin", PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run(["bash", "-c", script], cwd=home, env=env, capture_output=True, text=True,
                          timeout=timeout)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{script}\n--- output ---\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


def test_volunteer_installs_the_agent_from_the_page_and_gets_work(chromium, live_server, monkeypatch, tmp_path,
                                                                  settings):
    from marketplace.models import Worker
    from tests.training.factories import approved_proposal
    from training.models import Task
    from training.services.runs import run_start

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.AGORA_PUBLIC_URL = live_server.url
    settings.AGORA_HEARTBEAT_INTERVAL_S = 1
    run = run_start(proposal_id=approved_proposal(diloco={"rounds": 1, "inner_steps": 2}).pk)
    assert run is not None and run.status == "running", run
    UserFactory(username="volunteer")
    SHOTS.mkdir(parents=True, exist_ok=True)

    context = chromium.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto("/accounts/login/")
    page.fill("input[name=login]", "volunteer")
    page.fill("input[name=password]", PASSWORD)
    page.click("form button[type=submit], form input[type=submit]")
    page.wait_for_load_state()
    page.goto("/workers/add/")
    page.fill("input[name=name]", "attic-cpu")
    page.get_by_role("button", name="Create enrollment token").click()
    page.wait_for_selector("#enroll-commands")
    page.screenshot(path=str(SHOTS / "add-worker-1280.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(SHOTS / "add-worker-390.png"), full_page=True)
    install = page.inner_text("#install-commands").strip().splitlines()
    enroll, run_cmd = page.inner_text("#enroll-commands").strip().splitlines()
    context.close()

    # The page's two install lines: make the virtual environment, then pip install the wheel by its URL.
    make_venv, pip_install = install
    assert make_venv == "python3 -m venv ~/agora-worker && . ~/agora-worker/bin/activate"
    assert pip_install.startswith(f"pip install {live_server.url}/agent/agora_worker-")
    assert run_cmd == "agora-worker run"
    home = tmp_path / "home"
    home.mkdir()
    activate = ". ~/agora-worker/bin/activate"
    _shell(f"set -e\n{make_venv}\npip install --quiet {TORCH}\n{pip_install}\nagora-worker --version",
           home, tmp_path / "install.log", timeout=900)
    venv_python = home / "agora-worker" / "bin" / "python"
    assert venv_python.exists()
    where = subprocess.run([str(venv_python), "-c", "import workers, diloco; print(workers.__file__)"],
                           capture_output=True, text=True, check=True, cwd=home).stdout
    assert str(home) in where, f"the agent must come from the wheel, not a checkout: {where}"

    _shell(f"set -e\n{activate}\n{enroll}", home, tmp_path / "enroll.log", timeout=300)
    worker = Worker.objects.get(name="attic-cpu")
    assert worker.owner.username == "volunteer"

    # "On a machine without a CUDA GPU, run agora-worker run --allow-cpu" (the page's own words).
    env = {"HOME": str(home), "PATH": f"{home}/agora-worker/bin:/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    agent = Proc([str(home / "agora-worker" / "bin" / "agora-worker"), "run", "--allow-cpu"], env,
                 tmp_path / "agent.log", cwd=home)
    try:
        task = wait_for(lambda: Task.objects.filter(worker=worker).exclude(status="pending").first(), 300,
                        interval=1, what="the freshly installed agent to claim a task", procs=[agent])
        wait_for(lambda: Task.objects.filter(pk=task.pk, update_sha256__gt="").exists(), 300, interval=1,
                 what="the agent to upload its update", procs=[agent])
    finally:
        agent.stop()
    worker.refresh_from_db()
    # The agent kept the PyTorch it found and reports the packaged version.
    import workers

    assert worker.torch_version.startswith("2.13.0"), worker.torch_version
    assert worker.agent_version == workers.__version__
