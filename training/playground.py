"""Sampling from a community model with the output guardrails in force."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from diloco.guardrails import GuardrailError, check_output, ensure_enforceable
from diloco.models import generate
from governance.selectors import guardrails_active
from training import blobs
from training.models import CommunityModel

log = logging.getLogger(__name__)

# Generation on a shared cached module is not re-entrant enough to share between threads.
_generate_lock = threading.Lock()


@dataclass
class Sample:
    text: str
    checkpoint: str
    blocked_by: dict | None
    problem: str = ""  # set when a guardrail in force cannot be enforced, so nothing was generated


def sample_generate(*, model: CommunityModel, prompt: str, max_new_tokens: int, temperature: float,
                    seed: int) -> Sample:
    """Generate from the model's current checkpoint; if an output filter matches, withhold the text.

    Patterns run on RE2 (linear time), so a hostile pattern cannot pin the worker. An output filter RE2
    cannot compile (stored before patterns were checked with RE2) fails closed: nothing is generated and
    the sample names that guardrail, rather than showing text a guardrail in force was meant to screen.
    """
    sha = model.current_checkpoint_id
    guardrails = guardrails_active(kind="output_filter")
    try:
        ensure_enforceable(guardrails, "output_filter")
    except GuardrailError as exc:
        log.warning("playground output withheld: %s", exc)
        return Sample("", sha, exc.guardrail, problem=str(exc))
    net = blobs.checkpoint_model(sha)
    with _generate_lock:
        raw = generate(net, prompt.encode("utf-8"), max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=40, seed=seed)
    text = raw.decode("utf-8", errors="replace")
    guardrail = check_output(prompt + text, guardrails)
    if guardrail is not None:
        return Sample("", sha, guardrail)
    return Sample(text, sha, None)
