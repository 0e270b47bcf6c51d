"""README.md's examples run against the demo that `make run` seeds, and the demo is what the README says.

The test seeds the demo into the test database (`manage.py seed_demo`, the run started at once as Celery
would), enrolls the two CPU agents `make run` starts, and serves it on a live server. Then:

1. The demo's documented state (DEMO_* below, which the README's Quick start and "The demo" describe) is
   checked, and so is every `user` / `password` pair and every `http://127.0.0.1:8000/…` page the README
   names.
2. Every command in README.md's shell code blocks runs in README order, in one shell state, as a reader
   pasting them after `make run` would:
   - `curl` commands and shell assignments (`TOKEN=$(curl …)`, `H="…"`) run in bash with the real curl
     and jq; `localhost:8000` / `127.0.0.1:8000` (with or without `http://`) become the live server, and
     `$AGORA` is set to its address. Every HTTP answer must be 2xx; an answer from `/api/` must be JSON
     and carry the keys a JSON-shaped comment promises (`# {"seq": N, "hash": "..."}`); an assignment
     must yield a value (not empty, not `null`).
   - `python manage.py verify_ledger|export_ledger|check_guardrails` and `python -m ledger.verify` run with
     the venv's Python in a scratch folder, without `DJANGO_SECRET_KEY` or `DJANGO_DEBUG` (a shell beside
     `make run` has neither), and must exit 0. `SEQ:HASH` becomes the ledger's head at that moment; other
     `[optional]` arguments are left out.
   - Anything else (`make`, `pip`, `agora-worker`, `docker`) is listed as not run.
   A placeholder such as `<id>` in a command fails the test: the README must use the demo's real ids.
All problems are reported together, each naming its README line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from tests.docs.readme import Command, commands
from tests.procs import ROOT, child_env

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True, reset_sequences=True)]

# AGORA_README checks a draft of the README against the demo before it replaces the real one.
README = Path(os.environ.get("AGORA_README", str(ROOT / "README.md")))
HOST = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8000")
PLACEHOLDER = re.compile(r"<[A-Za-z][\w-]*>")

# --- the demo's documented state ------------------------------------------------------------------------
# What `make run` gives a newcomer. README.md's Quick start promises these ("log in as `alice` / `agora-demo`",
# and the list "What the demo seeds"); when one changes, change the other.
DEMO_PASSWORD = "agora-demo"
DEMO_USERS = {"admin": True, "alice": False, "bob": False, "carol": False, "dave": False}  # name: staff?
DEMO_PROPOSALS = {  # id: (kind, status, author)
    1: ("guardrail", "enacted", "alice"),  # output filter "Keep credentials out of generated text", in force
    2: ("training", "enacted", "bob"),  # "Teach the demo model Python's documentation": run 1
    3: ("guardrail", "active", "carol"),  # data filter "Drop Python 2 material from training data"
    4: ("training", "active", "dave"),  # "A longer run on GPU volunteers"
    5: ("training", "draft", "alice"),  # "Draft: a wider model"
    6: ("training", "succeeded", "carol"),  # "Twenty more rounds at a lower learning rate": staff may approve
    7: ("training", "succeeded", "dave"),  # "Fine-tune on a forum dump" (licence unclear): staff may veto
}
DEMO_GUARDRAILS_IN_FORCE = {"output_filter": 1}  # kind: from proposal id
DEMO_RUNS = {1: (2, "running")}  # run id: (proposal id, status once Celery picked it up)
# Community models: whether each has a current version. run 1 trains llama-demo, whose first version comes
# with its first accepted round; byte-gpt-demo is there from the start, for the playground.
DEMO_MODELS = {"byte-gpt-demo": True, "llama-demo": False}
DEMO_WORKERS = {"demo-cpu-1": "alice", "demo-cpu-2": "alice"}  # the two CPU agents `make run` starts


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)

    def fail(self, where, message: str) -> None:
        self.problems.append(f"{where}\n    {message}")


def _enroll_demo_agents():
    """What `manage.py run_demo_agent` does before its agents start: one enrollment per agent, by alice."""
    from marketplace.services import enrollment_token_create, worker_enroll

    alice = get_user_model().objects.get(username="alice")
    for name in DEMO_WORKERS:
        token = enrollment_token_create(owner=alice, name=name).token
        worker_enroll(enrollment_token=token, name=name, agent_version="demo",
                      hardware={"gpus": [], "cpu_count": 2, "memory_mb": 4096, "torch": "2", "cuda": ""},
                      benchmark={"tflops": 0.1, "mem_gbps": 5.0})


@pytest.fixture
def reader_tools():
    """The README's examples use curl and jq, as its reader does."""
    import shutil

    missing = [tool for tool in ("curl", "jq", "bash") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("AGORA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"the README examples need {missing}")
        pytest.skip(f"no {missing} on this machine")


@pytest.fixture
def demo(reader_tools, live_server, settings):
    """The seeded demo on a live server, with `make run`'s settings (Makefile, `run:` target)."""
    from datetime import timedelta

    settings.AGORA_VOTER_ELIGIBILITY = "verified_email"
    settings.AGORA_VOTING_PERIOD = timedelta(minutes=10)
    settings.AGORA_VOTING_MIN, settings.AGORA_VOTING_MAX = timedelta(minutes=2), timedelta(hours=24)
    settings.CELERY_TASK_ALWAYS_EAGER = True  # the approved proposal becomes run 1, as the Celery worker does
    call_command("seed_demo", stdout=open(os.devnull, "w"))
    # From here on Celery tasks are only enqueued (the filesystem broker or Redis), as with a busy worker.
    settings.CELERY_TASK_ALWAYS_EAGER = False
    (Path(settings.VAR_DIR) / "celery" / "queue").mkdir(parents=True, exist_ok=True)
    _enroll_demo_agents()
    return live_server.url


def check_documented_state(report: Report, base_url: str, readme: str) -> None:
    from governance.models import Guardrail, Proposal
    from marketplace.models import Worker
    from training.models import CommunityModel, TrainingRun

    users = get_user_model().objects
    for name, staff in DEMO_USERS.items():
        user = users.filter(username=name).first()
        if user is None:
            report.fail("demo users", f"no user {name!r}")
        elif user.is_staff != staff:
            report.fail("demo users", f"{name}: staff={user.is_staff}, documented as {staff}")
        elif (status := api_log_in(base_url, name, DEMO_PASSWORD)) != 200:
            report.fail("demo users", f"{name} / {DEMO_PASSWORD}: POST /api/v1/auth/token answered {status}")
    proposals = {p.pk: (p.kind, p.status, p.author.username) for p in Proposal.objects.select_related("author")}
    for pk, want in DEMO_PROPOSALS.items():
        if proposals.get(pk) != want:
            report.fail("demo proposals", f"proposal {pk} is {proposals.get(pk)}, documented as {want}")
    if extra := sorted(set(proposals) - set(DEMO_PROPOSALS)):
        report.fail("demo proposals", f"undocumented proposals {extra}: {[proposals[p] for p in extra]}")
    for kind, pk in DEMO_GUARDRAILS_IN_FORCE.items():
        if not Guardrail.objects.filter(active=True, kind=kind, proposal_id=pk).exists():
            report.fail("demo guardrails", f"no {kind} in force from proposal {pk}")
    runs = {r.pk: (r.proposal_id, r.status) for r in TrainingRun.objects.all()}
    if runs != DEMO_RUNS:
        report.fail("demo runs", f"runs {runs}, documented as {DEMO_RUNS}")
    models = {m.slug: m.current_checkpoint_id is not None for m in CommunityModel.objects.all()}
    if models != DEMO_MODELS:
        report.fail("demo models", f"models (with a current version?) {models}, documented as {DEMO_MODELS}")
    workers = {w.name: w.owner.username for w in Worker.objects.select_related("owner")}
    if workers != DEMO_WORKERS:
        report.fail("demo workers", f"workers {workers}, documented as {DEMO_WORKERS}")

    # What the README itself names: log-ins and pages of the running demo.
    for number, line in enumerate(readme.splitlines(), 1):
        pairs = re.findall(r"`([\w.@+-]+)`\s*/\s*`([^`]+)`", line)
        for name, password in pairs if re.search(r"log ?in|password", line, re.I) else []:
            if name not in DEMO_USERS or password != DEMO_PASSWORD:
                report.fail(f"README.md line {number}", f"log-in {name} / {password} is not a demo account")
            elif (status := api_log_in(base_url, name, password)) != 200:
                report.fail(f"README.md line {number}", f"log-in {name} / {password} answered {status}")
        for url in re.findall(r"https?://(?:localhost|127\.0\.0\.1):8000(/[^\s>)`'\"]*)?", line):
            if "<" in url or "…" in url:  # a placeholder (`/agent/agora_worker-<version>…`): nothing to fetch
                continue
            status, _, body = http_get(base_url + (url or "/"))
            if status != 200:
                report.fail(f"README.md line {number}", f"page {url or '/'} answered {status}: {body[:200]}")


def api_log_in(base_url: str, username: str, password: str) -> int:
    body = urllib.parse.urlencode({"username": username, "password": password}).encode()
    try:
        with urllib.request.urlopen(f"{base_url}/api/v1/auth/token", data=body, timeout=60) as answer:
            return answer.status if json.load(answer).get("token") else 0
    except urllib.error.HTTPError as error:
        return error.code


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode(errors="replace")


class ReaderShell:
    """One terminal's worth of state: the variables earlier examples set, a scratch folder to work in."""

    def __init__(self, base_url: str, workdir: Path):
        self.base_url = base_url
        self.workdir = workdir
        self.headers = workdir / ".headers"
        self.headers.mkdir()
        self.variables = {"AGORA": base_url}

    def substitute(self, command: Command, report: Report) -> str | None:
        from ledger.selectors import ledger_head

        text = HOST.sub(self.base_url, command.text)
        if "SEQ:HASH" in text:
            head = ledger_head()
            text = text.replace("SEQ:HASH", f"{head['seq']}:{head['hash']}")
        if command.is_safe_program:  # `[--head …]` filled in above is kept, other optional arguments dropped
            text = re.sub(r"\[([^\]]*)\]", lambda m: "" if re.search(r"[A-Z]{2,}|<", m.group(1)) else m.group(1),
                          text)
        if placeholders := PLACEHOLDER.findall(text):
            report.fail(command, f"has placeholders {placeholders} the reader cannot paste; use the demo's ids")
            return None
        return text

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.workdir), "LANG": "C.UTF-8",
                "AGORA_README_HEADERS": str(self.headers), **self.variables}

    def run_shell(self, command: Command, report: Report) -> None:
        text = self.substitute(command, report)
        if text is None:
            return
        for old in self.headers.iterdir():
            old.unlink()
        name = command.assigns
        script = ("set -o pipefail\n"
                  'curl() { command curl --max-time 60 -D "$(mktemp -p "$AGORA_README_HEADERS")" "$@"; }\n'
                  f"{text}\n" + (f'printf %s "${{{name}}}"\n' if name else ""))
        done = subprocess.run(["bash", "-c", script], env=self.env(), cwd=self.workdir, capture_output=True,
                              text=True, timeout=180)
        answers = [_last_answer(path.read_text(errors="replace")) for path in sorted(self.headers.iterdir())]
        report.ran.append(str(command))
        if done.returncode != 0:
            report.fail(command, f"exited {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
            return
        if command.uses_curl and not answers:
            report.fail(command, "curl got no answer")
        for status, _ in answers:
            if not 200 <= status < 300:
                report.fail(command, f"answered {status}: {done.stdout[-400:]}")
                return
        if name:
            if done.stdout.strip() in ("", "null"):
                report.fail(command, f"left ${name} empty ({done.stdout!r}): {done.stderr[-300:]}")
                return
            self.variables[name] = done.stdout
            return
        if len(answers) == 1 and "|" not in text and not re.search(r"\s(-o|--output)\s", text):
            status, content_type = answers[0]
            if status != 204 and ("/api/" in text or "json" in content_type):
                try:
                    body = json.loads(done.stdout)
                except ValueError:
                    report.fail(command, f"answered {status} with no JSON: {done.stdout[:300]!r}")
                    return
                missing = [k for k in command.documented_keys if not isinstance(body, dict) or k not in body]
                if missing:
                    report.fail(command, f"the answer lacks the documented keys {missing}: {done.stdout[:300]}")

    def run_program(self, command: Command, report: Report) -> None:
        text = self.substitute(command, report)
        if text is None:
            return
        text = re.sub(r"^(?:\S*/)?python3?\b", sys.executable, text)
        text = re.sub(r"(?:\S*/)?manage\.py\b", str(ROOT / "manage.py"), text, count=1)
        env = child_env()
        for name in ("DJANGO_SECRET_KEY", "DJANGO_DEBUG"):
            env.pop(name, None)
        env["PYTHONPATH"] = str(ROOT)
        done = subprocess.run(["bash", "-c", text], env=env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=180)
        report.ran.append(str(command))
        if done.returncode != 0:
            report.fail(command, f"exited {done.returncode}: {(done.stderr or done.stdout)[-600:]}")


def _last_answer(headers: str) -> tuple[int, str]:
    """The final status and Content-Type in a `curl -D` dump (after any 100 Continue or redirect)."""
    statuses = re.findall(r"^HTTP/\S+\s+(\d{3})", headers, re.M)
    types = re.findall(r"^content-type:\s*(\S+)", headers, re.M | re.I)
    return (int(statuses[-1]) if statuses else 0), (types[-1] if types else "")


def test_readme_examples_run_against_the_seeded_demo(demo, tmp_path):
    readme = README.read_text()
    report = Report()
    check_documented_state(report, demo, readme)

    shell = ReaderShell(demo, tmp_path)
    examples = commands(readme)
    for command in examples:
        if command.uses_curl or command.assigns:
            shell.run_shell(command, report)
        elif command.is_safe_program:
            shell.run_program(command, report)
        else:
            report.not_run.append(str(command))
    curls = [c for c in examples if c.uses_curl]
    assert len(curls) >= 5, f"found only {len(curls)} curl examples in README.md: is the extractor broken?"
    print(f"ran {len(report.ran)} README commands; not run:\n  " + "\n  ".join(report.not_run))
    if report.problems:
        pytest.fail(f"{len(report.problems)} of README.md's claims fail against the seeded demo "
                    f"(ran {len(report.ran)} commands):\n" + "\n".join(report.problems), pytrace=False)
