"""Does DiLoCo keep the quality of data-parallel training at a fraction of the communication?

    python -m bench.fidelity                   # full: 750/1500/3000 steps (60 outer rounds), lr sweeps, every family
    python -m bench.fidelity --family llama    # one family (byte-gpt, llama, llama-bpe)
    python -m bench.fidelity --quick           # 100/200 steps, no sweep (~1 min per family on 2 idle cores)

A *family* is a model and a tokenizer: ``byte-gpt`` (our GPT over bytes), ``llama`` (a Hugging Face Llama
config of the same size over the same bytes) and ``llama-bpe`` (the same Llama over a byte-level BPE of
1024 ids trained on the training split). Each family runs the same arms. Every arm sees the same held-out
split of ``builtin:python-docs`` and (except the single worker) the same number of training tokens; k = 4
workers each own one shard of the training documents.

Losses are reported as nats per token and as bits per byte, bpb = loss × tokens / (bytes × ln 2) over
the held-out text (for bytes, loss / ln 2), so byte-level and BPE models compare.

- data-parallel (DP): every step averages the gradients of the k workers' micro-batches (gradient
  accumulation), i.e. one AdamW step on the k× larger batch; one sync (an fp32 gradient all-reduce) per
  step. lr tuned by a 4-value sweep.
- DiLoCo fp32 / int8: k workers, H = 50 inner AdamW steps between syncs (warmup then constant lr), outer
  Nesterov SGD with momentum 0.9, through the server's own round, ``diloco.round.outer_round`` (screening
  with its default limits, mean aggregate, outer step; the evaluation gate is off, so no step is refused
  and the arm is the plain algorithm). The inner lr is swept like DP's (4 values, fp32, with the DiLoCo
  paper's outer lr 0.7), then the outer lr (3 values) with that inner lr; int8 reuses fp32's values.
- FedAvg: DiLoCo with outer lr 1 and no momentum (the average of the workers' models).
- single worker: one worker doing the same number of inner steps on its own shard and batch (k× fewer
  tokens), the DiLoCo paper's baseline.
- SparseLoCo (byte-gpt family; ``bench.fidelity_sparse``): the DiLoCo inner loop and inner lr; each worker
  sends the top 2% of every chunk of 4096 values of its error-feedback buffer in 2 bits (β 0.95) and the
  server steps with plain SGD on the mean, outer lr swept over {1, 2, 4}; variants: with overlap (each
  round trained wholly ahead from the worker's own last weights, then moved onto the new checkpoint, as the
  agent does: one-step-delayed pseudo-gradients), 1% and 3% density, 4 bits, error-feedback β 0.99, and
  Nesterov momentum 0.9 on top at the same effective step. Workers download the exact
  published step (``diloco.sparse``), not the weights; the bench checks it rebuilds the server's weights
  bitwise every round.

A sweep whose best value lies on the edge of its grid (full grids only) then tries the next value past that
edge, up to twice: an lr doubled or halved, an outer lr the next of 0.1, 0.15, 0.25, 0.4, 0.7, 1.0, 1.3, 1.6.
An optimum on the edge is a grid too narrow, not an optimum (the llama family's outer lr chose 0.4, the lowest
of {0.4, 0.7, 1.0}).

Runs use a constant lr after warmup, so a run's loss at step L is the loss of a run of length L: every
run goes to the longest length and is evaluated every H steps, which gives all run lengths at once. The
sweeps are judged at the longest length (where the targets are) and the chosen lrs are used at every
length.

Communication, bytes per worker, sent + received (both directions are counted for every arm):
- DP: a ring all-reduce of the fp32 gradient, 2·(k−1)/k × model bytes sent and the same received, per step.
- DiLoCo: per round, upload the encoded pseudo-gradient and download the outer update (θ_old − θ_new)
  encoded with the same codec. For int8 the server broadcasts the int8-quantised outer update and keeps
  the dequantised parameters itself, so server and workers hold the same weights (this is simulated,
  not just counted). Byte counts are the real encoded (safetensors) sizes.
- SparseLoCo: the encoded sparse update up and the encoded published step down.
Simulated time over a 100 Mbit/s link per worker = steps × the compute time of one training step
(one micro-batch forward/backward + AdamW step on this CPU, one thread; workers run in parallel) + bytes
sent and received / 100 Mbit/s (a half-duplex budget; latency is ignored). The step time is the median
of 30 steps, measured before the runs and again after them; the lower of the two medians is used, since
other load on a shared machine only ever makes a step slower. With overlap a round's traffic travels
while the next round trains: a round takes the longer of its compute and its link time.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import time

import torch

from bench.common import fmt_bytes, median_time, print_table

K = 4
H = 50
WARMUP = 20
LINK_BITS_PER_S = 100e6
OUTER_LADDER = (0.1, 0.15, 0.25, 0.4, 0.7, 1.0, 1.3, 1.6)
EDGE_EXTENSIONS = 2


LLAMA = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 64}
FAMILIES = {
    "byte-gpt": {"arch": "byte-gpt", "model": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64},
                 "bpe_vocab": None},
    "llama": {"arch": "llama", "model": LLAMA, "bpe_vocab": None},
    "llama-bpe": {"arch": "llama", "model": LLAMA, "bpe_vocab": 1024},
}


def _documents():
    from diloco.data import load_documents, split_documents

    return split_documents(load_documents("builtin:python-docs"), 0.1, seed=0)


def _train_tokenizer(vocab: int) -> bytes:
    from diloco.tokenization import train_bpe

    return train_bpe(_documents()[0], vocab)


def _encode(docs: list[str], tokenizer_json: bytes | None):
    """Documents as one token stream: bytes with blank lines between, or BPE ids with end-of-text between."""
    from diloco.data import encode_documents
    from diloco.tokenization import load_tokenizer

    if tokenizer_json is None:
        return encode_documents(docs)
    tok = load_tokenizer(tokenizer_json)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tok.encode(doc))
        ids.extend(tok.separator)
    return torch.tensor(ids, dtype=torch.long)


def _setup(p: dict):
    """Shards, held-out tokens, held-out bytes per token, vocabulary size."""
    from diloco.data import shard_documents

    torch.set_num_threads(1)
    train, held = _documents()
    tokenizer_json = p.get("tokenizer")
    shards = [_encode(shard_documents(train, i, K), tokenizer_json) for i in range(K)]
    held_tokens = _encode(held, tokenizer_json)
    held_bytes = sum(len(d.encode("utf-8")) for d in held) + 2 * len(held)
    vocab = None
    if tokenizer_json is not None:
        from diloco.tokenization import load_tokenizer

        vocab = load_tokenizer(tokenizer_json).vocab_size
    return shards, held_tokens, held_bytes / held_tokens.numel(), vocab


def _bpb(loss: float, bytes_per_token: float) -> float:
    return loss / (bytes_per_token * math.log(2))


def _eval(model, held, seq_len):
    from diloco.evaluate import evaluate_loss

    return evaluate_loss(model, held, batch_size=32, seq_len=seq_len, batches=8)


def run_dp(p: dict) -> dict:
    """One AdamW step per iteration on the k workers' micro-batches together (= averaged gradients)."""
    from diloco.data import sample_batch
    from diloco.inner import InnerConfig, make_optimizer
    from diloco.models import build_model, lm_loss

    shards, held, bytes_per_token, vocab = _setup(p)
    model = build_model(p["arch"], p["model"], seed=0, vocab_size=vocab)
    cfg = InnerConfig(steps=1, lr=p["lr"], batch_size=p["batch"], seq_len=p["seq_len"], warmup=WARMUP)
    opt = make_optimizer(model, cfg)
    params = list(model.parameters())
    n_params = sum(x.numel() for x in params)
    gens = [torch.Generator().manual_seed(w) for w in range(K)]
    curve = []
    per_step = 2 * (2 * (K - 1) / K) * 4 * n_params  # ring all-reduce of fp32 grads: sent + received
    torch.manual_seed(0)
    for step in range(1, p["steps"] + 1):
        # Each of the k workers computes the gradient of its own micro-batch (in parallel, in a real run);
        # the averaged gradient then drives one AdamW step, which every worker performs.
        opt.zero_grad(set_to_none=True)
        for w in range(K):
            x, y = sample_batch(shards[w], p["batch"], p["seq_len"], gens[w])
            loss = lm_loss(model, x, y)
            (loss / K).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = p["lr"] * min(1.0, step / WARMUP)
        opt.step()
        if step in p["eval_at"]:
            loss = _eval(model, held, p["seq_len"])
            curve.append({"step": step, "loss": loss, "bpb": _bpb(loss, bytes_per_token), "syncs": step,
                          "bytes": int(step * per_step)})
    return {"name": p["name"], "curve": curve}


def run_diloco(p: dict) -> dict:
    """k workers × H inner steps, encode/decode their pseudo-gradients, then the server's outer round."""
    from diloco.codecs import decode_update, encode_update, reference_of
    from diloco.inner import InnerConfig, inner_train
    from diloco.models import build_model, init_state
    from diloco.round import AggregatorSpec, OuterSpec, Update, outer_round

    shards, held, bytes_per_token, vocab = _setup(p)
    k = p.get("workers", K)
    params = init_state(p["arch"], p["model"], seed=0, vocab_size=vocab)
    ref = reference_of(params)
    outer = OuterSpec(lr=p["outer_lr"], momentum=p["momentum"], nesterov=p["momentum"] > 0)
    h = p.get("h", H)  # inner steps per round
    cfg = InnerConfig(steps=h, lr=p["lr"], batch_size=p["batch"], seq_len=p["seq_len"], warmup=WARMUP)
    model = build_model(p["arch"], p["model"], vocab_size=vocab)

    def evaluate(state):
        model.load_state_dict(state)
        return _eval(model, held, p["seq_len"])

    states = [None] * k
    outer_state, loss = None, None
    curve, moved, turned_away = [], 0, 0
    for rnd in range(p["steps"] // h):
        updates = []
        for w in range(k):
            model.load_state_dict(params)
            result = inner_train(model, shards[w], cfg, seed=1000 * rnd + w, optimizer_state=states[w])
            states[w] = result.optimizer_state
            if p["codec"]:
                data = encode_update(result.pseudo_gradient, p["codec"])
                moved += len(data) if w == 0 else 0  # upload of worker 0 (all workers send the same size)
                updates.append(Update(w, decode_update(data, ref)))
            else:
                updates.append(Update(w, result.pseudo_gradient))
        res = outer_round(base_state=params, updates=updates, evaluate=evaluate, eval_before=loss,
                          aggregator=AggregatorSpec(method="mean"), outer=outer, outer_state=outer_state,
                          eval_tolerance=math.inf)
        turned_away += sum(not v.accepted for v in res.verdicts)
        if not res.accepted:  # every update screened out: the round leaves the weights as they were
            continue
        old, params, loss = params, res.new_state, res.eval_after
        outer_state = res.optimizer.state_tensors()
        if p["codec"]:
            # Broadcast the outer update θ_old − θ_new with the same codec; with a lossy codec the server
            # keeps what the workers decode, so everyone holds the same weights.
            data = encode_update({n: old[n] - params[n] for n in params}, p["codec"])
            moved += len(data)
            if p["codec"] != "fp32":
                delta = decode_update(data, ref)
                params = {n: old[n] - delta[n] for n in old}
                loss = evaluate(params)
        step = (rnd + 1) * h
        if step in p["eval_at"]:
            curve.append({"step": step, "loss": loss, "bpb": _bpb(loss, bytes_per_token),
                          "syncs": rnd + 1 if p["codec"] else 0, "bytes": moved})
    return {"name": p["name"], "curve": curve, "turned_away": turned_away}


def _run(p: dict) -> dict:
    if p["kind"] == "sparse":
        from bench.fidelity_sparse import run_sparse

        return run_sparse(p)
    return run_dp(p) if p["kind"] == "dp" else run_diloco(p)


def _pool(jobs: int):
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))


def _final(res: dict) -> float:
    return res["curve"][-1]["loss"]


def _past_edge(grid: list[float], best: float, ladder: tuple[float, ...] | None = None) -> float | None:
    """The value past the edge of ``grid`` that ``best`` sits on (an lr doubled or halved, or the next rung of
    ``ladder``), or None when ``best`` is inside the grid or the grid is too small to have an inside."""
    if len(grid) < 3 or min(grid) < best < max(grid):
        return None
    lower = best == min(grid)
    if ladder is None:
        return best / 2 if lower else best * 2
    rungs = [v for v in ladder if (v < best if lower else v > best)]
    return (rungs[-1] if lower else rungs[0]) if rungs else None


def _at(res: dict, step: int) -> dict:
    return next(pt for pt in res["curve"] if pt["step"] == step)


def _step_seconds(arch: str, model_cfg: dict, batch: int, seq_len: int, repeat: int, vocab: int | None = None) -> float:
    """Median seconds of one training step (forward/backward of one micro-batch + AdamW), one thread."""
    from diloco.inner import InnerConfig, make_optimizer
    from diloco.models import build_model, lm_loss

    torch.set_num_threads(1)
    model = build_model(arch, model_cfg, seed=0, vocab_size=vocab)
    opt = make_optimizer(model, InnerConfig(steps=1, lr=1e-3, batch_size=batch, seq_len=seq_len))
    x = torch.randint(0, vocab or 256, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return median_time(step, repeat=repeat, warmup=2)


def _n_params(arch: str, model_cfg: dict, vocab: int | None = None) -> int:
    from diloco.models import param_count

    return param_count(arch, model_cfg, vocab_size=vocab)


PROJECTED_MODEL = {"n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 256}  # the 25M model of bench.turnaround


def run_family(family: str, args, pool) -> dict:
    """Every arm of one family (model + tokenizer); prints its tables and returns its summary row."""
    fam = FAMILIES[family]
    arch, model = fam["arch"], fam["model"]
    batch, seq_len, outer_lr, momentum = 8, 64, 0.7, 0.9
    if args.quick:
        lengths = [100, 200]
        dp_grid, inner_grid, outer_grid = [4e-3], [4e-3], [outer_lr]
    else:
        lengths = [750, 1500, 3000]
        dp_grid, inner_grid = [1e-3, 2e-3, 4e-3, 8e-3], [5e-4, 1e-3, 2e-3, 4e-3]
        outer_grid = [0.4, outer_lr, 1.0]
    if args.grid == "narrow":  # the byte-gpt optima and their upper neighbours (a quarter of the sweep)
        dp_grid, inner_grid, outer_grid = [2e-3, 4e-3], [1e-3, 2e-3], [outer_lr]
    if args.max_steps:
        lengths = [n for n in lengths if n <= args.max_steps] or [args.max_steps]
    tokenizer = _train_tokenizer(fam["bpe_vocab"]) if fam["bpe_vocab"] else None
    _, held, bytes_per_token, vocab = _setup({"tokenizer": tokenizer})
    base = {"arch": arch, "model": model, "tokenizer": tokenizer, "batch": batch, "seq_len": seq_len}
    n_params = _n_params(arch, model, vocab)
    print(f"\n## family {family}: {arch} {model} over {'BPE ' + str(vocab) if vocab else 'bytes'} "
          f"({bytes_per_token:.2f} bytes per held-out token) = {n_params:,} parameters; k={K} workers, per-worker "
          f"batch {batch}x{seq_len}, H={H}, outer Nesterov momentum {momentum}, outer lr from {outer_grid}; DP batch "
          f"{K * batch}x{seq_len}", flush=True)
    step_before = _step_seconds(arch, model, batch, seq_len, repeat=30, vocab=vocab)
    print(f"measured compute per training step on this CPU (1 thread, median of 30): {1e3 * step_before:.1f} ms",
          flush=True)

    steps = lengths[-1]
    common = {**base, "steps": steps, "eval_at": list(range(H, steps + 1, H))}

    def dp_arm(lr, name=None):
        return {**common, "kind": "dp", "name": name or f"DP lr={lr:g}", "lr": lr}

    def diloco_arm(lr, olr, *, codec="fp32", mom=momentum, workers=K, name=None):
        return {**common, "kind": "diloco", "name": name or f"DiLoCo fp32 inner lr={lr:g} outer lr={olr:g}",
                "lr": lr, "outer_lr": olr, "momentum": mom, "codec": codec, "workers": workers}

    # The sweeps run at the longest length, where the targets are judged, and record the whole curve; the
    # winning runs are the DP and DiLoCo fp32 arms themselves. (Tuned at a short length the winners are
    # short-horizon settings: an outer lr of 1 beats 0.7 at 15 rounds and loses clearly at 60.)
    first = [dp_arm(lr) for lr in dp_grid] + [diloco_arm(lr, outer_lr) for lr in inner_grid]
    done = dict(zip((j["name"] for j in first), pool.map(_run, first), strict=True))
    best_dp = min(dp_grid, key=lambda lr: _final(done[dp_arm(lr)["name"]]))
    best_inner = min(inner_grid, key=lambda lr: _final(done[diloco_arm(lr, outer_lr)["name"]]))
    for _ in range(EDGE_EXTENSIONS):  # an optimum on the edge of its grid: try the value past it
        more = []
        if (lr := _past_edge(dp_grid, best_dp)) is not None:
            dp_grid.append(lr)
            more.append(dp_arm(lr))
        if (lr := _past_edge(inner_grid, best_inner)) is not None:
            inner_grid.append(lr)
            more.append(diloco_arm(lr, outer_lr))
        if not more:
            break
        print("on the edge of its grid, so also: " + ", ".join(j["name"] for j in more), flush=True)
        first += more
        done.update(zip((j["name"] for j in more), pool.map(_run, more), strict=True))
        best_dp = min(dp_grid, key=lambda lr: _final(done[dp_arm(lr)["name"]]))
        best_inner = min(inner_grid, key=lambda lr: _final(done[diloco_arm(lr, outer_lr)["name"]]))
    # Then the outer lr with the chosen inner lr, alongside the baselines that only need the inner lr.
    second = [diloco_arm(best_inner, olr) for olr in outer_grid if olr != outer_lr]
    baselines = [diloco_arm(best_inner, 1.0, mom=0.0, name="FedAvg fp32"),
                 diloco_arm(best_inner, 1.0, mom=0.0, codec=None, workers=1, name="single worker")]
    second += [] if args.core else baselines
    done.update(zip((j["name"] for j in second), pool.map(_run, second), strict=True))
    best_outer = min(outer_grid, key=lambda olr: _final(done[diloco_arm(best_inner, olr)["name"]]))
    for _ in range(EDGE_EXTENSIONS):
        olr = _past_edge(outer_grid, best_outer, OUTER_LADDER)
        if olr is None:
            break
        outer_grid.append(olr)
        more = diloco_arm(best_inner, olr)
        print(f"on the edge of its grid, so also: {more['name']}", flush=True)
        second.append(more)
        done[more["name"]] = pool.submit(_run, more).result()
        best_outer = min(outer_grid, key=lambda olr: _final(done[diloco_arm(best_inner, olr)["name"]]))
    int8 = diloco_arm(best_inner, best_outer, codec="int8", name="DiLoCo int8")
    if not args.core:
        done[int8["name"]] = pool.submit(_run, int8).result()
    # SparseLoCo arms (bench.fidelity_sparse): top-k 2-bit updates with error feedback, published steps.
    sparse, best_sparse = [], None
    if not args.core and family == "byte-gpt":
        from bench.fidelity_sparse import sparse_arms

        sparse, sparse_done, best_sparse = sparse_arms(pool, common, best_inner, quick=args.quick)
        done.update(sparse_done)

    sweep = [j for j in first + second if j["name"] not in ("FedAvg fp32", "single worker")]
    if len(sweep) > 2:
        print_table(["sweep run", *(f"loss @{n}" for n in lengths)],
                    [(j["name"], *(f"{_at(done[j['name']], n)['loss']:.4f}" for n in lengths)) for j in sweep],
                    title=f"{family}: lr sweep, judged at {steps} steps (chosen: DP lr {best_dp:g}; DiLoCo inner lr "
                          f"{best_inner:g}, outer lr {best_outer:g}); the chosen settings are used at every length")
    arms = [dp_arm(best_dp, name="data-parallel"), diloco_arm(best_inner, best_outer, name="DiLoCo fp32")]
    arms += [] if args.core else [int8, *baselines]
    arms += sparse
    results = {
        "data-parallel": done[dp_arm(best_dp)["name"]],
        "DiLoCo fp32": done[diloco_arm(best_inner, best_outer)["name"]],
        **{name: done[name] for name in ("DiLoCo int8", "FedAvg fp32", "single worker") if name in done},
        **{a["name"]: done[a["name"]] for a in sparse},
    }

    step_after = _step_seconds(arch, model, batch, seq_len, repeat=30, vocab=vocab)
    step_s = min(step_before, step_after)
    print(f"\ncompute per training step: {1e3 * step_before:.1f} ms before the runs, {1e3 * step_after:.1f} ms after; "
          f"using {1e3 * step_s:.1f} ms", flush=True)

    def link_s(point, scale=1.0):
        return point["bytes"] * scale * 8 / LINK_BITS_PER_S

    def sim_time(point, per_step=step_s, scale=1.0):
        from bench.fidelity_sparse import sim_time as overlapped_time  # overlap arms hide their link time

        return overlapped_time(point, per_step, LINK_BITS_PER_S, H, scale)

    def at(name, length):
        return _at(results[name], length)

    for length in lengths:
        dp_point = at("data-parallel", length)
        rows = []
        for arm in arms:
            pt = at(arm["name"], length)
            tokens = length * batch * seq_len * arm.get("workers", K)
            rows.append((arm["name"], f"{pt['loss']:.4f}", f"{pt['bpb']:.4f}",
                         f"{100 * (pt['loss'] / dp_point['loss'] - 1):+.2f}%", f"{tokens:,}", pt["syncs"],
                         fmt_bytes(pt["bytes"]), f"{dp_point['bytes'] / pt['bytes']:.0f}x" if pt["bytes"] else "-",
                         f"{sim_time(pt):.1f}"))
        print_table(["arm", "held-out loss", "bits/byte", "vs DP", "tokens", "syncs", "bytes/worker (sent+recv)",
                     "fewer bytes than DP", "sim. time @100Mbit/s (s)"], rows,
                    title=f"{family}: {length} steps per worker ({length // H} outer rounds)")
    turned = {a["name"]: results[a["name"]].get("turned_away", 0) for a in arms if a["kind"] == "diloco"}
    print("updates turned away by the round's screening: " + ", ".join(f"{n} {c}" for n, c in turned.items()))

    target = max(_final(results["data-parallel"]), _final(results["DiLoCo fp32"]))
    hits = {a["name"]: next((pt for pt in results[a["name"]]["curve"] if pt["loss"] <= target), None) for a in arms}
    rows = []
    for arm in arms:
        hit = hits[arm["name"]]
        rows.append((arm["name"], hit["step"] if hit else "not reached",
                     f"{hit['step'] * step_s:.1f}" if hit else "-", f"{link_s(hit):.1f}" if hit else "-",
                     f"{sim_time(hit):.1f}" if hit else "-"))
    print_table(["arm", "step reached", "compute (s)", "link (s)", "total (s)"], rows,
                title=f"{family}: measured time to held-out loss {target:.4f} over a simulated 100 Mbit/s link per "
                      f"worker")

    def speedups(per_step, scale):
        dp = hits["data-parallel"]
        out = {}
        for name in ("DiLoCo fp32", "DiLoCo int8", *(a["name"] for a in sparse)):
            if dp and hits.get(name):
                out[name] = sim_time(dp, per_step, scale) / sim_time(hits[name], per_step, scale)
        return out

    measured = speedups(step_s, 1.0)
    print("\nmeasured: " + "; ".join(f"{n} reaches the target {v:.1f}x sooner than DP" for n, v in measured.items()))

    if not args.quick and family == "byte-gpt":
        n_big = _n_params("byte-gpt", PROJECTED_MODEL)
        big_step_s = _step_seconds("byte-gpt", PROJECTED_MODEL, batch, seq_len, repeat=3)
        scale = n_big / n_params
        rows = []
        for arm in arms:
            hit = hits[arm["name"]]
            rows.append((arm["name"], hit["step"] if hit else "not reached",
                         f"{hit['step'] * big_step_s:.0f}" if hit else "-",
                         f"{link_s(hit, scale):.0f}" if hit else "-",
                         f"{sim_time(hit, big_step_s, scale):.0f}" if hit else "-"))
        print_table(["arm", "step reached (from the small model)", "compute (s)", "link (s)", "total (s)"], rows,
                    title=f"PROJECTION, not measured: the same steps-to-target for the {n_big / 1e6:.1f}M-parameter "
                          f"model {PROJECTED_MODEL} (compute {big_step_s:.2f} s/step measured on this CPU, 1 thread, "
                          f"batch {batch}x{seq_len}; bytes scaled by parameter count {scale:.0f}x)")
        projected = speedups(big_step_s, scale)
        print("\nprojected (25M): " + "; ".join(f"{n} {v:.1f}x sooner than DP" for n, v in projected.items()))

    dp_final, fp32_final = _final(results["data-parallel"]), _final(results["DiLoCo fp32"])
    dp_b, fp32_b = (results[n]["curve"][-1]["bytes"] for n in ("data-parallel", "DiLoCo fp32"))
    line = (f"{family}, longest run ({steps} steps, {steps // H} rounds): DiLoCo fp32 vs DP "
            f"{100 * (fp32_final / dp_final - 1):+.2f}% loss at {dp_b / fp32_b:.0f}x fewer bytes")
    if not args.core:
        int8_final, int8_b = _final(results["DiLoCo int8"]), results["DiLoCo int8"]["curve"][-1]["bytes"]
        line += (f"; int8 vs fp32 {100 * (int8_final / fp32_final - 1):+.2f}% at {fp32_b / int8_b:.2f}x fewer bytes; "
                 f"FedAvg {_final(results['FedAvg fp32']):.4f}, single worker {_final(results['single worker']):.4f}, "
                 f"DiLoCo fp32 {fp32_final:.4f}")
    print(line, flush=True)
    for arm in sparse:
        pt, hit = results[arm["name"]]["curve"][-1], measured.get(arm["name"])
        print(f"{arm['name']} (outer lr {arm['outer_lr']:g} from the sweep's {best_sparse:g}, momentum "
              f"{arm['momentum']:g}, error feedback {arm['beta']:g}): loss {100 * (pt['loss'] / fp32_final - 1):+.2f}% vs "
              f"DiLoCo fp32 [target <= 0]; {dp_b / pt['bytes']:.0f}x fewer bytes than DP, downloads included "
              f"[target >= 1000x]; " + (f"{hit:.1f}x sooner to the target than DP" if hit else "target not reached")
              + " [target >= 20x]", flush=True)
    last = {name: results[name]["curve"][-1] for name in results}
    return {"family": family, "params": n_params, "steps": steps, "tokens": steps * batch * seq_len * K,
            "bytes_per_token": bytes_per_token, **{f"{name} bpb": last[name]["bpb"] for name in last},
            "vs_dp": fp32_final / dp_final - 1,
            "int8_vs_dp": _final(results["DiLoCo int8"]) / dp_final - 1 if "DiLoCo int8" in results else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, no sweep, no 25M projection")
    ap.add_argument("--family", action="append", choices=list(FAMILIES),
                    help="model family to run (repeatable; default: all)")
    ap.add_argument("--max-steps", type=int, default=0, help="cap the run lengths (steps per worker)")
    ap.add_argument("--grid", choices=["full", "narrow"], default="full",
                    help="narrow: DP lr {2,4}e-3, inner lr {1,2}e-3, outer lr 0.7 (the full run's sweep otherwise)")
    ap.add_argument("--core", action="store_true", help="only DP and DiLoCo fp32 (no int8, FedAvg, single worker)")
    ap.add_argument("--jobs", type=int, default=2, help="arms run in parallel, one thread each")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    summaries = []
    with _pool(args.jobs) as pool:
        for family in args.family or list(FAMILIES):
            summaries.append(run_family(family, args, pool))
    print_table(["family", "params", "tokens (all workers)", "bytes/token", "DP bpb", "DiLoCo fp32 bpb",
                 "DiLoCo int8 bpb", "single worker bpb", "DiLoCo vs DP (loss)", "int8 vs DP"],
                [(r["family"], f"{r['params']:,}", f"{r['tokens']:,}", f"{r['bytes_per_token']:.2f}",
                  *(f"{r[k]:.4f}" if k in r else "-" for k in ("data-parallel bpb", "DiLoCo fp32 bpb",
                                                                  "DiLoCo int8 bpb", "single worker bpb")),
                  f"{100 * r['vs_dp']:+.2f}%", f"{100 * r['int8_vs_dp']:+.2f}%" if r["int8_vs_dp"] is not None else "-")
                 for r in summaries],
                title="families at the longest run, bits per byte on the same held-out text (lower is better)")
    print(f"bench wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
