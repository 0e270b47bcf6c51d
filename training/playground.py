"""Sampling from a community model with the output guardrails in force."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from diloco.guardrails import check_output
from diloco.models import generate
from governance.selectors import guardrails_active
from training import blobs
from training.models import CommunityModel

# Generation on a shared cached module is not re-entrant enough to share between threads.
_generate_lock = threading.Lock()


@dataclass
class Sample:
    text: str
    checkpoint: str
    blocked_by: dict | None


def sample_generate(*, model: CommunityModel, prompt: str, max_new_tokens: int, temperature: float,
                    seed: int) -> Sample:
    """Generate from the model's current checkpoint; if an output filter matches, withhold the text."""
    sha = model.current_checkpoint_id
    net = blobs.checkpoint_model(sha)
    with _generate_lock:
        raw = generate(net, prompt.encode("utf-8"), max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=40, seed=seed)
    text = raw.decode("utf-8", errors="replace")
    guardrail = check_output(prompt + text, guardrails_active(kind="output_filter"))
    if guardrail is not None:
        return Sample("", sha, guardrail)
    return Sample(text, sha, None)
