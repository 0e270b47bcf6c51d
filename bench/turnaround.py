"""Round turnaround: from the last accepted upload to the next checkpoint written, through the real services.

    python -m bench.turnaround                       # 25M-parameter byte-gpt, k=8 int8 updates, SQLite
    DATABASE_URL=postgres://... python -m bench.turnaround --rounds 5
    AGORA_TRAINING_DEVICE=cuda python -m bench.turnaround   # held-out evaluation on a GPU

The first ``--rounds`` rounds run with the contribution checks off (``AGORA_SCORE_CONTRIBUTIONS=0``), the next
``--rounds`` with them on, so both turnarounds come from the same run. Each round: 8 workers claim and upload
int8 pseudo-gradients (``task_submit_result``, validated as in
production), then ``round_aggregate`` runs: claim the round, read and decode the 8 updates, screen them,
aggregate (trimmed mean), apply the outer Nesterov step, evaluate held-out loss and write the checkpoint
and the outer optimizer state (overlapped where that is faster), commit, open the next round. The Celery
hop that triggers it in production (on_commit enqueue, worker pickup) is not included. Baselines measured in the same run: the plain
aggregate of 8 decoded updates, and plain ``save_weights`` + storage write of one checkpoint.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time

# Phases that run one after another (the eval and the two saves overlap inside eval_and_save_s).
_SEQUENTIAL = ("decode_s", "screen_s", "contributions_s", "eval_before_s", "aggregate_s", "outer_step_s", "eval_and_save_s")
CONFIG = {"n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 256}


def _spec(rounds: int, k: int) -> dict:
    return {
        "model": {"name": "bench-25m", "arch": "byte-gpt", "config": CONFIG, "init": "scratch"},
        "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
        "diloco": {"rounds": rounds, "workers_per_round": k, "min_workers": k, "inner_steps": 20,
                   "batch_size": 8, "seq_len": 64, "warmup": 5, "compression": "int8",
                   "aggregator": "trimmed_mean", "round_timeout_s": 3600},
        "hardware": {"min_vram_mb": 0, "allow_cpu": True},
    }


def _descent_direction(state: dict, *, norm: float) -> dict:
    """The loss gradient at ``state`` on a batch of the built-in corpus, scaled to global ``norm``."""
    import torch

    from diloco.data import encode_documents, load_documents, sample_batch
    from diloco.models import build_model, lm_loss

    model = build_model("byte-gpt", CONFIG)
    model.load_state_dict(state)
    tokens = encode_documents(load_documents("builtin:python-docs")[:200])
    x, y = sample_batch(tokens, 8, 64, torch.Generator().manual_seed(0))
    loss = lm_loss(model, x, y)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    total = sum(float(g.norm()) ** 2 for g in grads.values()) ** 0.5
    return {k: grads[k] * (norm / total) if k in grads else torch.zeros_like(v) for k, v in state.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)

    from bench.django_env import throwaway_database

    with throwaway_database() as connection, tempfile.TemporaryDirectory(prefix="agora-bench-") as blob_dir:
        import torch
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.test import override_settings

        from diloco.aggregate import aggregate
        from diloco.checkpoint import save_weights
        from diloco.codecs import decode_update, encode_update
        from diloco.models import warm_up
        from governance.models import Proposal
        from governance.specs import content_hash, spec_normalise
        from marketplace.models import Worker
        from training import blobs, services
        from training.models import Round

        override_settings(STORAGES={**settings.STORAGES, "checkpoints": {
            "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": blob_dir}}}).enable()
        user = get_user_model().objects.create_user("bench", password="x" + secrets.token_hex(8))
        spec = spec_normalise(kind="training", spec=_spec(2 * args.rounds, args.workers))
        proposal = Proposal.objects.create(kind="training", status="approved", title="bench", author=user, spec=spec,
                                           content_hash=content_hash(spec))
        workers = [Worker.objects.create(owner=user, name=f"bench-{i}", gpus=[], token_hash=secrets.token_hex(32))
                   for i in range(args.workers)]
        run = services.run_start(proposal_id=proposal.pk)
        warm_up()  # as a Celery worker process does when it starts
        state, _ = blobs.checkpoint_state(run.base_checkpoint_id)
        n_params = sum(v.numel() for v in state.values())
        reference = blobs.model_reference("byte-gpt", CONFIG)
        metrics = {"loss_start": 5.0, "loss_end": 4.5, "steps": 20, "tokens": 10240, "seconds": 10.0}

        descent = _descent_direction(state, norm=0.5)

        def fake_update(seed: int) -> bytes:
            # A step down the loss's gradient plus per-worker noise: it lowers the loss on every shard, as
            # the contribution checks require, and no two are alike enough to pass for replays.
            gen = torch.Generator().manual_seed(seed)
            return encode_update({k: descent[k] + torch.randn(v.shape, generator=gen) * 5e-5
                                  for k, v in state.items()}, "int8")

        turnaround, upload_s, phases = [], [], []
        unscored: list[float] = []
        update_bytes = 0
        for index in range(1, 2 * args.rounds + 1):
            scoring = index > args.rounds
            override_settings(AGORA_SCORE_CONTRIBUTIONS=scoring).enable()
            payloads = [fake_update(index * 100 + i) for i in range(args.workers)]
            update_bytes = len(payloads[0])
            rnd = Round.objects.get(run=run, index=index)
            started = time.perf_counter()
            for worker, data in zip(workers, payloads, strict=True):
                task = services.task_claim(worker=worker)
                services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
            upload_s.append((time.perf_counter() - started) / args.workers)
            started = time.perf_counter()
            done = services.round_aggregate(round_id=rnd.pk)
            assert done is not None and done.accepted, (done and done.reason)
            if scoring:
                turnaround.append(time.perf_counter() - started)
                phases.append(done.timings)
            else:
                unscored.append(time.perf_counter() - started)

        # Baselines: the same work with no services around it.
        decoded = [decode_update(fake_update(i), reference) for i in range(args.workers)]
        agg_s = []
        for _ in range(3):
            started = time.perf_counter()
            aggregate(decoded, "trimmed_mean")
            agg_s.append(time.perf_counter() - started)
        save_s = []
        for i in range(3):
            started = time.perf_counter()
            data = save_weights({k: v + i for k, v in state.items()}, {"arch": "byte-gpt", "config": CONFIG})
            blobs.blob_write(f"bench/plain-{i}.safetensors", data)
            save_s.append(time.perf_counter() - started)

        def med(key):
            values = [p.get(key) for p in phases if p.get(key) is not None]
            return statistics.median(values) if values else float("nan")

        print(f"\nRound turnaround on {connection.vendor}, {n_params / 1e6:.1f}M parameters, k={args.workers} int8 "
              f"updates of {update_bytes / 1e6:.1f} MB, evaluation on {services.eval_device()} "
              f"in {str(services.eval_precision() or 'fp32').removeprefix('torch.')}, "
              f"{torch.get_num_threads()} CPU threads (median of {args.rounds} rounds)\n")
        rows = [
            ("baseline: round turnaround with the contribution checks off", statistics.median(unscored[1:] or unscored)),
            ("round turnaround (last upload -> checkpoint, committed)", statistics.median(turnaround)),
            ("  read + decode 8 updates", med("decode_s")),
            ("  screen (norms, cosines)", med("screen_s")),
            ("  contribution checks (replay sketches, scores against the round's centre)", med("contributions_s")),
            ("  aggregate (trimmed mean)", med("aggregate_s")),
            ("  outer Nesterov step", med("outer_step_s")),
            ("  held-out eval and saving (wall; overlapped where it pays)", med("eval_and_save_s")),
            ("    held-out eval after the step", med("eval_after_s")),
            ("    save checkpoint", med("save_checkpoint_s")),
            ("    save outer optimizer state", med("save_outer_state_s")),
            ("  the rest (claim, commit with credits and ledger, open next round)",
             statistics.median(t - sum(v for k, v in p.items() if k in _SEQUENTIAL)
                               for t, p in zip(turnaround, phases, strict=True))),
            ("baseline: plain aggregate of 8 decoded updates", statistics.median(agg_s)),
            ("baseline: plain save_weights + storage write", statistics.median(save_s)),
            ("one upload (claim + validate + store), mean", statistics.median(upload_s)),
        ]
        print(f"{'step':<80} {'seconds':>8}")
        for label, value in rows:
            print(f"{label:<80} {value:>8.3f}")
        print(f"\nper round, checks off: {', '.join(f'{t:.2f}' for t in unscored)} s (round 1 also evaluates the "
              f"starting checkpoint); checks on: {', '.join(f'{t:.2f}' for t in turnaround)} s")
        target = 2.0
        for label, values in (("checks off", unscored[1:] or unscored), ("checks on", turnaround)):
            verdict = "meets" if statistics.median(values) < target else "misses"
            print(f"target < {target:.0f} s, {label}: {verdict} it")


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret")
    main()
