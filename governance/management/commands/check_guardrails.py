"""``manage.py check_guardrails``: list guardrails in force that the linear-time RE2 engine cannot enforce.

Patterns are checked with RE2 when proposed; guardrails stored before that check may hold patterns RE2
refuses (backreferences, lookaround). Those fail closed (the playground withholds output, agents fail their
tasks naming the guardrail) until a proposal retires them. Exit status 1 when there are any.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from rest_framework import serializers

from governance.models import Guardrail
from governance.specs import spec_normalise


def _messages(detail, prefix: str = "") -> list[str]:
    if isinstance(detail, dict):
        return [m for key, value in detail.items() for m in _messages(value, f"{prefix}{key}.")]
    if isinstance(detail, list):
        return [m for item in detail for m in _messages(item, prefix)]
    return [f"{prefix.rstrip('.')}: {detail}" if prefix else str(detail)]


class Command(BaseCommand):
    help = "List active guardrails whose patterns the RE2 engine refuses (exit status 1 if any)."

    def handle(self, *args, **options):
        broken = 0
        for guardrail in Guardrail.objects.filter(active=True).order_by("id"):
            try:
                spec_normalise(kind="guardrail", spec={"kind": guardrail.kind, "patterns": guardrail.patterns})
            except serializers.ValidationError as exc:
                broken += 1
                patterns = (exc.detail.get("spec") or {}).get("patterns", exc.detail.get("spec"))
                if isinstance(patterns, dict):
                    problems = [f"pattern {int(i) + 1} {guardrail.patterns[int(i)]!r}: {m}"
                                for i, msgs in patterns.items() for m in _messages(msgs)]
                else:
                    problems = _messages(patterns)
                self.stdout.write(f"guardrail #{guardrail.pk} ({guardrail.title}, {guardrail.get_kind_display()}) "
                                  f"cannot be enforced:")
                for problem in problems:
                    self.stdout.write(f"  {problem}")
        if broken:
            raise CommandError(f"{broken} active guardrail(s) cannot be enforced; propose retiring them and "
                               "adopting RE2 versions")
        self.stdout.write("every active guardrail compiles on RE2")
