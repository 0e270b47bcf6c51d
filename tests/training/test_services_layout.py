"""The services package keeps its shape: public names at the package, no import of the Celery tasks, and
the outer round importable without Django."""

import ast
import pathlib
import subprocess
import sys

from training import services

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_service_module_imports_the_celery_tasks():
    for path in (ROOT / "training" / "services").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "training.tasks" for n in names), f"{path.name} imports training.tasks"


def test_the_public_services_are_reexported():
    assert all(hasattr(services, name) for name in services.__all__)
    for name in ("run_start", "run_cancel", "task_claim", "task_submit_result", "task_fail", "round_check",
                 "round_aggregate", "community_model_ensure", "task_stop_reason", "rounds_release_stale"):
        assert callable(getattr(services, name)), name


def test_the_outer_round_runs_without_django():
    code = ("import sys; sys.modules['django'] = None; import torch; from diloco.round import Update, outer_round; "
            "base = {'w': torch.zeros(4)}; ups = [Update(i, {'w': torch.full((4,), 0.1 + 0.01 * i)}) for i in range(4)]; "
            "r = outer_round(base_state=base, updates=ups, evaluate=lambda s: float(s['w'].sum() + 10)); "
            "print(r.accepted, [v.code for v in r.verdicts])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True ['accepted', 'accepted', 'accepted', 'accepted']"
