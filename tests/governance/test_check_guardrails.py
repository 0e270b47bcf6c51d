import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from governance.models import Guardrail
from tests.governance.factories import GuardrailFactory

pytestmark = pytest.mark.django_db


def test_lists_the_active_guardrails_re2_refuses(capsys):
    GuardrailFactory(title="Fine", patterns=[r"\bsecret\b", "(a+)+$"])
    legacy = GuardrailFactory(title="Lookahead", kind=Guardrail.Kind.OUTPUT_FILTER, patterns=["ok", "x(?=y)"])
    GuardrailFactory(title="Retired", patterns=[r"(a)\1"], active=False, retired_at=timezone.now())
    with pytest.raises(CommandError, match="1 active guardrail"):
        call_command("check_guardrails")
    out = capsys.readouterr().out
    assert f"guardrail #{legacy.pk} (Lookahead, Output filter) cannot be enforced" in out
    assert "pattern 2 'x(?=y)': Not a valid regular expression for the linear-time RE2 engine" in out
    assert "Fine" not in out and "Retired" not in out


def test_all_good(capsys):
    GuardrailFactory(patterns=["fine"])
    call_command("check_guardrails")
    assert "every active guardrail compiles on RE2" in capsys.readouterr().out
