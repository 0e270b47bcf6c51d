"""Sampling from a model version with its tokenizer, streamed, with the output guardrails in force.

Output guardrails apply to the generated text only: a member's prompt is theirs, and a guardrail that fired
on it would block every continuation of a prompt that merely names what the guardrail is about.

Streaming holds back the last ``HOLD_BACK_CHARS`` characters of the text until more has been generated
and the whole text so far has passed the guardrails. A match no longer than that is therefore never shown,
not even in part, before it is caught; when the sampler stops, the rest is checked once more and released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from diloco.guardrails import GuardrailError, check_output, ensure_enforceable
from diloco.models import generate_tokens
from diloco.tokenization import load_tokenizer
from governance.selectors import guardrails_active
from training.models import ModelVersion
from training.services.versions import version_module, version_tokenizer_json

log = logging.getLogger(__name__)

HOLD_BACK_CHARS = 80
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 400

# One sampling step at a time on a shared cached module (steps of different requests may interleave).
_generate_lock = threading.Lock()


@dataclass
class Sample:
    text: str
    checkpoint: str
    blocked_by: dict | None
    problem: str = ""  # set when a guardrail in force cannot be enforced, so nothing was generated
    version: int | None = None
    tokens: int = 0
    events: list = field(default_factory=list, repr=False)


def _tokenizer(version: ModelVersion):
    return load_tokenizer(version_tokenizer_json(version))


def sample_events(*, version: ModelVersion, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int | None = 40, top_p: float | None = None, seed: int = 0) -> Iterator[dict]:
    """Events of one sample: ``start`` (the version), ``text`` chunks as they pass the guardrails, then
    ``done`` or ``withheld`` (the guardrail that matched, or one in force that cannot be enforced).

    An output filter RE2 cannot compile fails closed: nothing is generated and the event names it.
    """
    guardrails = guardrails_active(kind="output_filter")
    start = {"event": "start", "model": version.model.slug, "version": version.number,
             "checkpoint": version.checkpoint_id}
    try:
        ensure_enforceable(guardrails, "output_filter")
    except GuardrailError as exc:
        log.warning("playground output withheld: %s", exc)
        yield start
        yield {"event": "withheld", "guardrail": exc.guardrail, "problem": str(exc)}
        return
    tokenizer = _tokenizer(version)
    net = version_module(version)
    prompt_ids = tokenizer.encode(prompt) or list(tokenizer.separator)
    stop = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    steps = generate_tokens(net, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop=stop)
    yield start
    ids: list[int] = []
    sent = ""
    while True:
        with _generate_lock:
            token = next(steps, None)
        if token is None:
            break
        if token in stop:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        guardrail = check_output(text, guardrails)
        if guardrail is not None:
            yield {"event": "withheld", "guardrail": guardrail, "problem": ""}
            return
        ready = text[:max(0, len(text) - HOLD_BACK_CHARS)]
        if len(ready) > len(sent) and ready.startswith(sent):
            yield {"event": "text", "text": ready[len(sent):]}
            sent = ready
    text = tokenizer.decode(ids)
    if text.startswith(sent) and len(text) > len(sent):
        yield {"event": "text", "text": text[len(sent):]}
    elif not text.startswith(sent):  # a decoder that rewrote released text: send the whole of it again
        yield {"event": "replace", "text": text}
    yield {"event": "done", "tokens": len(ids)}


def sample_generate(*, version: ModelVersion, prompt: str, max_new_tokens: int, temperature: float,
                    top_k: int | None = 40, top_p: float | None = None, seed: int = 0) -> Sample:
    """The whole sample at once (the page without JavaScript); withheld text is never returned."""
    sample = Sample("", version.checkpoint_id, None, version=version.number)
    parts: list[str] = []
    for event in sample_events(version=version, prompt=prompt, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
        if event["event"] == "text":
            parts.append(event["text"])
        elif event["event"] == "replace":
            parts = [event["text"]]
        elif event["event"] == "withheld":
            return Sample("", version.checkpoint_id, event["guardrail"], problem=event["problem"],
                          version=version.number)
        elif event["event"] == "done":
            sample.tokens = event["tokens"]
    sample.text = "".join(parts)
    return sample
