"""Overlap (spec ``diloco.overlap``): the agent trains ahead while its upload travels and the server
aggregates, so the link and the coordinator stop leaving the GPU idle.

As soon as a task of an overlap run is trained, an :class:`AheadTrainer` thread goes on training from where
the inner loop left the model (θ_end, the agent's own weights after round r), on the same shard with the
same settings and AdamW state, in chunks of steps (H at most), while the result is encoded, uploaded and
aggregated and while the next task's checkpoint and data are made ready. When round r+1's task is about to
train on the new checkpoint θ_{r+1}, training ahead stops at the end of its chunk and the progress made ahead,
``Δ_ahead = θ_end − θ_ahead``, is moved onto the new weights: training resumes from ``θ_{r+1} − Δ_ahead``
for the steps still missing, and the update uploaded is ``Δ = θ_{r+1} − θ_final = Δ_ahead + Δ_rest``.

This is the one-step-delayed pseudo-gradient of DiLoCoX (arXiv:2506.21263) and of Streaming DiLoCo's
overlapping (arXiv:2501.18512), with the correction of re-applying the delayed local progress on top of the
fresh global weights rather than averaging stale weights in. The server sees an ordinary update measured from
the task's checkpoint (``base_checkpoint_sha256``), so robust screening and contribution scoring judge it
like any other; the metrics say how many of its steps were trained ahead (``overlap_steps``) and from which
round's weights (``overlap_from_round``). A head start is used only for the same run's next round; a gap,
another run, a LoRA task, a task without ``overlap`` or one that must start AdamW afresh (a spot-checked task,
which another worker repeats exactly) discards it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

log = logging.getLogger("agora.worker.overlap")

CHUNKS = 4  # the ahead trainer checks for the next task this many times per H steps


@dataclasses.dataclass
class AheadContext:
    """Where a task's training ended: what the next round's head start continues from."""

    run_id: object
    round: int
    model: torch.nn.Module
    tokens: torch.Tensor
    cfg: object  # diloco.inner.InnerConfig
    optimizer_state: dict
    seed: int
    device: str


@dataclasses.dataclass
class HeadStart:
    run_id: object
    from_round: int
    delta: dict  # θ_end − θ_ahead, float32 on the CPU
    steps: int
    optimizer_state: dict
    loss_start: float
    loss_end: float
    seconds: float


class AheadTrainer(threading.Thread):
    """Trains ahead from an :class:`AheadContext` until :meth:`finish` (or ``max_steps``)."""

    def __init__(self, ctx: AheadContext, *, max_steps: int | None = None):
        super().__init__(name="agora-ahead", daemon=True)
        self.ctx = ctx
        self.max_steps = int(max_steps if max_steps is not None else ctx.cfg.steps)
        self.chunk = max(1, self.max_steps // CHUNKS)
        self._halt = threading.Event()
        self.steps = 0
        self.seconds = 0.0
        self.loss_start = float("nan")
        self.loss_end = float("nan")
        self.error: BaseException | None = None
        self._result: HeadStart | None = None
        self._finished = False
        self._start_state = {k: v.detach().to("cpu", torch.float32, copy=True)
                             for k, v in ctx.model.state_dict().items()}

    def run(self) -> None:
        from diloco.inner import inner_train

        ctx = self.ctx
        opt = ctx.optimizer_state
        try:
            while not self._halt.is_set() and self.steps < self.max_steps:
                n = min(self.chunk, self.max_steps - self.steps)
                cfg = dataclasses.replace(ctx.cfg, steps=n)
                t = time.perf_counter()
                result = inner_train(ctx.model, ctx.tokens, cfg, seed=ctx.seed * 1_000_003 + 7919 * (self.steps + 1),
                                     device=ctx.device, optimizer_state=opt)
                self.seconds += time.perf_counter() - t
                opt = result.optimizer_state
                if self.steps == 0:
                    self.loss_start = result.loss_start
                self.loss_end = result.loss_end
                self.steps += n
        except BaseException as exc:  # a failure ahead must not cost the next task: it starts afresh
            self.error = exc
            log.warning("training ahead stopped: %s", exc)
        self.ctx.optimizer_state = opt

    def halt(self, *, wait: bool = True) -> None:
        """Stop training at the end of the current chunk (what was trained stays usable)."""
        self._halt.set()
        if wait and self.is_alive():
            self.join()

    def finish(self) -> HeadStart | None:
        """Stop at the end of the current chunk; the head start, or None when nothing usable was trained."""
        self.halt()
        if self._finished:
            return self._result
        self._finished = True
        if self.error is not None or self.steps == 0:
            return None
        end = {k: v.detach().to("cpu", torch.float32) for k, v in self.ctx.model.state_dict().items()}
        delta = {k: self._start_state[k] - end[k] for k in end}
        if not all(torch.isfinite(d).all() for d in delta.values()):
            return None
        self._result = HeadStart(self.ctx.run_id, self.ctx.round, delta, self.steps, self.ctx.optimizer_state,
                                 self.loss_start, self.loss_end, self.seconds)
        return self._result


def _usable(head: HeadStart | None, task: dict) -> bool:
    return (head is not None and task.get("overlap") is True and head.run_id == task.get("run_id")
            and isinstance(task.get("round"), int) and head.from_round == task["round"] - 1
            and not (task.get("model") or {}).get("lora") and task.get("optimizer") != "fresh")


def inner_train_with_head_start(runner, task: dict, model, tokens, cfg, *, seed: int, device, optimizer_state,
                                progress=None):
    """``diloco.inner.inner_train`` for a task, continuing the head start the agent trained ahead when
    there is one for this task (see the module docstring), and keeping where it ends for the next one.
    Sets ``runner.overlap_info`` (``overlap_steps``, ``overlap_from_round``, ``compute_seconds``)."""
    from diloco.inner import InnerResult, inner_train

    # Training ahead goes on while this task's checkpoint, model and data are made ready; it stops here.
    ahead: AheadTrainer | None = getattr(runner, "ahead", None)
    runner.ahead = None
    head = ahead.finish() if ahead is not None else None
    runner.overlap_info = {}
    if not _usable(head, task):
        head = None
    if head is not None:
        theta = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
        if set(theta) != set(head.delta) or any(theta[k].shape != head.delta[k].shape for k in theta):
            head = None
    if head is None:
        result = inner_train(model, tokens, cfg, seed=seed, device=device, optimizer_state=optimizer_state,
                             progress=progress)
    else:
        with torch.no_grad():
            model.load_state_dict({k: theta[k] - head.delta[k] for k in theta}, strict=True)
        rest = cfg.steps - head.steps
        log.info("task %s: %d of %d steps were trained ahead from round %s's weights; moved onto the new "
                 "checkpoint", task.get("id"), head.steps, cfg.steps, head.from_round)
        if rest > 0:
            part = inner_train(model, tokens, dataclasses.replace(cfg, steps=rest), seed=seed, device=device,
                               optimizer_state=head.optimizer_state, progress=progress)
            delta = {k: head.delta[k] + part.pseudo_gradient[k] for k in head.delta}
            loss_end, seconds, opt = part.loss_end, part.seconds, part.optimizer_state
        else:
            delta, loss_end, seconds, opt = head.delta, head.loss_end, 0.0, head.optimizer_state
            model.to(device)
        total = seconds + head.seconds
        result = InnerResult(pseudo_gradient=delta, loss_start=head.loss_start, loss_end=loss_end, steps=cfg.steps,
                             tokens=cfg.steps * cfg.batch_size * cfg.seq_len, seconds=total, optimizer_state=opt,
                             tokens_per_s=cfg.steps * cfg.batch_size * cfg.seq_len / total if total > 0 else 0.0)
        runner.overlap_info = {"overlap_steps": head.steps, "overlap_from_round": head.from_round}
    runner.overlap_info["compute_seconds"] = float(result.seconds)
    if getattr(runner, "train_ahead", False) and task.get("overlap") is True and isinstance(task.get("round"), int) \
            and not (task.get("model") or {}).get("lora"):
        # From here on, encoding, saving and uploading this result overlap with training ahead.
        runner.ahead = AheadTrainer(AheadContext(task.get("run_id"), task["round"], model, tokens, cfg,
                                                 result.optimizer_state, int(seed), str(device)),
                                    max_steps=getattr(runner, "ahead_max_steps", None))
        runner.ahead.start()
    return result
