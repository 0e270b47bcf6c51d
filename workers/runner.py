"""One task, end to end: checkpoint -> model -> data shard -> inner loop -> encoded pseudo-gradient.

The training comes from ``diloco``; this module only wires the task JSON of the worker protocol to it:

1. the checkpoint is fetched into a content-addressed cache (``<cache>/checkpoints/<sha256>.safetensors``),
   verified by sha256 after download and again before reuse;
2. the model is ``diloco.models.build_model(model.arch, model.config, vocab_size=model.vocab_size)`` with the
   checkpoint's weights; with ``model.lora`` (rank, alpha, dropout, target_modules) the checkpoint holds the
   adapters (``diloco.lora.trainable_state`` keys) and ``model.lora_base_sha256`` (fetched the same way,
   from ``model.lora_base_url`` if given) the frozen base weights they sit on;
3. the data is ``shard_documents(filter_documents(split_documents(load_documents(source, sha256, policy),
   heldout_fraction)[0], guardrails)[0], shard_index, shard_count)``, encoded as bytes; the policy reads
   ``file:`` sources only under the agent's data root (none by default) and https only from public
   addresses, and the data filters run on RE2;
4. ``diloco.inner.inner_train`` runs the task's inner settings and seed on the agent's device, starting from
   the AdamW state this machine kept for the run (``<cache>/optim/<run_id>.safetensors``; DiLoCo keeps the
   inner optimizer state per worker), which is kept again afterwards (in memory for the next round, written
   to disk behind the work: ``workers.keep``);
5. the pseudo-gradient (over the adapters only, for LoRA) is encoded with
   ``diloco.codecs.encode_update(delta, task.compression)``; the metrics carry ``tokens_per_s``.

The agent uploads the output (or reports the failure); the runner talks to the server only to download.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from workers.client import Client, DownloadError, ProtocolError
from workers.keep import StateKeeper

log = logging.getLogger("agora.worker.runner")


class TaskAborted(Exception):
    """The volunteer (or a revoked token) stopped the task before it finished."""


class TaskError(Exception):
    """The task cannot be run as given (malformed task, data too small, result too large ...)."""


class Hooks(Protocol):
    def check(self) -> None:
        """Called between steps: raises :class:`TaskAborted` to stop, may block while paused."""

    def on_step(self, step: int, steps: int, loss: float) -> None: ...


@dataclass
class TaskOutput:
    update: bytes
    metrics: dict
    details: dict


class ProgressDisplay:
    """A tqdm bar on stderr when it is a terminal; otherwise a log line every ``every_s`` seconds."""

    def __init__(self, total: int, desc: str, *, every_s: float = 30.0, tty: bool | None = None):
        self.total = total
        self.desc = desc
        self.every_s = every_s
        self._last_log = time.monotonic()
        self._bar = None
        if tty if tty is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_log >= self.every_s or step == self.total:
            self._last_log = now
            log.info("%s: step %d/%d (%.0f%%), loss %.4f", self.desc, step, self.total, 100.0 * step / self.total,
                     loss)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _field(task: dict, dotted: str):
    value = task
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TaskError(f"the task has no {dotted}")
        value = value[part]
    return value


DEFAULT_MAX_DATASET_BYTES = 256 * 1024**2


class TaskRunner:
    """Runs tasks on this machine.

    ``data_root``: the folder ``file:`` dataset sources must resolve into (None, the default, refuses file
    sources: the server cannot make this agent read its own files). ``max_dataset_bytes`` caps a dataset
    read from a file or downloaded over https (only from public addresses).
    """

    def __init__(self, *, client: Client, cache_dir: Path, device: str = "cpu", progress_every_s: float = 30.0,
                 data_root: str | Path | None = None, max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES):
        self.client = client
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.progress_every_s = progress_every_s
        self.data_root = str(data_root) if data_root else None
        self.max_dataset_bytes = int(max_dataset_bytes)
        self.keeper = StateKeeper()  # per-run state between rounds: in memory, written to disk behind the work

    def close(self, timeout: float | None = 60.0) -> None:
        """Finish writing the state kept between rounds (the agent calls this before it exits)."""
        if not self.keeper.flush(timeout):
            log.warning("the state kept between rounds is still being written; a restart may begin it afresh")

    # --- cache ----------------------------------------------------------------------------------

    def checkpoint_file(self, sha256: str) -> Path:
        return self.cache_dir / "checkpoints" / f"{sha256.lower()}.safetensors"

    def optimizer_file(self, run_id: int) -> Path:
        return self.cache_dir / "optim" / f"{int(run_id)}.safetensors"

    def fetch_checkpoint(self, sha256: str, *, url: str | None = None, hooks: Hooks | None = None,
                         task: dict | None = None) -> bytes:
        from diloco.checkpoint import sha256_hex

        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
            raise TaskError(f"checkpoint_sha256 is not a sha256: {sha256!r}")
        if task is not None:  # the task's own checkpoint: from the cache, or rebuilt from the published step
            from workers.sync import fetch_task_checkpoint

            data = fetch_task_checkpoint(self, task, sha256, hooks)
            if data is not None:
                return data
        path = self.checkpoint_file(sha256)
        if path.exists():
            data = path.read_bytes()
            if sha256_hex(data) == sha256.lower():
                log.debug("checkpoint %s… from the cache", sha256[:12])
                return data
            log.warning("cached checkpoint %s… is corrupt; downloading it again", sha256[:12])
            path.unlink(missing_ok=True)

        def on_bytes(done: int, total: int | None) -> None:
            if hooks is not None:
                hooks.check()

        log.info("downloading checkpoint %s…", sha256[:12])
        try:
            self.client.download_checkpoint(sha256.lower(), path, url=url, on_bytes=on_bytes)
        except DownloadError as exc:
            raise TaskError(str(exc)) from exc
        return path.read_bytes()

    def _load_optimizer_state(self, run_id: int, model, cfg) -> dict | None:
        from safetensors.torch import load as st_load

        from diloco.inner import import_optimizer_state, make_optimizer

        path = self.optimizer_file(run_id)
        kept = self.keeper.get(path, run_id)  # this process's own state of the run's last round
        if kept is not None:
            return kept
        if not path.exists():
            return None
        try:
            state = st_load(path.read_bytes())
            import_optimizer_state(model, make_optimizer(model, cfg), state)  # validates names and shapes
        except Exception as exc:  # a stale or damaged file must not fail the task: start the optimizer afresh
            log.warning("discarding the saved optimizer state of run %s (%s)", run_id, exc)
            path.unlink(missing_ok=True)
            return None
        return state

    def _save_optimizer_state(self, run_id: int, state: dict) -> None:
        from safetensors.torch import save as st_save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        self.keeper.put(self.optimizer_file(run_id), tensors,
                        lambda: st_save(tensors, metadata={"run_id": str(run_id)}), run_id=run_id)

    # --- the task -------------------------------------------------------------------------------

    def load_tokens(self, task: dict):
        """The task's data shard as tokens, after the data-filter guardrails (RE2: linear time).

        A dataset source this agent's policy refuses, or a guardrail RE2 cannot compile, fails the task
        with a reason naming it; a guardrail in force is never skipped.
        """
        from diloco.data import (
            DatasetError,
            SourcePolicy,
            encode_documents,
            load_documents,
            shard_documents,
            split_documents,
        )
        from diloco.guardrails import GuardrailError, filter_documents

        dataset = _field(task, "dataset")
        if isinstance(dataset, dict) and dataset.get("shard_sha256"):
            return self.load_prepared_tokens(task)
        policy = SourcePolicy(data_root=self.data_root, max_bytes=self.max_dataset_bytes)
        try:
            docs = load_documents(_field(task, "dataset.source"), dataset.get("sha256"),
                                  cache_dir=str(self.cache_dir / "datasets"), policy=policy)
        except DatasetError as exc:
            raise TaskError(str(exc)) from exc
        train, _ = split_documents(docs, float(dataset.get("heldout_fraction", 0.0)))
        guardrails = [g for g in task.get("guardrails") or [] if isinstance(g, dict) and g.get("kind") == "data_filter"]
        try:
            kept, dropped = filter_documents(train, guardrails)
        except GuardrailError as exc:
            raise TaskError(str(exc)) from exc
        shard = shard_documents(kept, int(_field(task, "dataset.shard_index")), int(_field(task, "dataset.shard_count")))
        return encode_documents(shard), {"documents": len(shard), "dropped_by_guardrails": dropped}

    def fetch_data(self, kind: str, sha256, *, url: str | None = None) -> bytes:
        """A prepared run's tokenizer or shard (``kind`` tokenizers|shards), from the content-addressed cache
        (``<cache>/data/<kind>/<sha256>``, checked again before reuse) or downloaded and verified."""
        from diloco.checkpoint import sha256_hex

        if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
            raise TaskError(f"the task's {kind[:-1]} sha256 is not a sha256: {sha256!r}")
        sha256 = sha256.lower()
        path = self.cache_dir / "data" / kind / sha256
        if path.exists():
            data = path.read_bytes()
            if sha256_hex(data) == sha256:
                return data
            log.warning("cached %s %s… is corrupt; downloading it again", kind[:-1], sha256[:12])
            path.unlink(missing_ok=True)
        log.info("downloading %s %s…", kind[:-1], sha256[:12])
        try:
            self.client.download_data(kind, sha256, path, url=url, max_bytes=self.max_dataset_bytes)
        except DownloadError as exc:
            raise TaskError(str(exc)) from exc
        except ProtocolError as exc:
            if exc.status not in (404, 409):
                raise
            raise TaskError(f"the server cannot give {kind[:-1]} {sha256[:12]}…: HTTP {exc.status} {exc.error}: "
                            f"{exc.detail}") from exc
        return path.read_bytes()

    def load_prepared_tokens(self, task: dict):
        """A prepared run's shard (only this task's) as token ids, without the documents the data filters in
        force drop now; the tokenizer decodes each document for the filters. Both are fetched by sha256."""
        from diloco.data import ShardError, read_token_shard, shard_filtered_tokens
        from diloco.guardrails import GuardrailError
        from diloco.tokenization import TokenizerError, load_tokenizer

        dataset = _field(task, "dataset")
        spec = task.get("tokenizer") or {"kind": "byte"}
        if not isinstance(spec, dict) or spec.get("kind") not in ("byte", "bpe"):
            raise TaskError(f"the task's tokenizer is malformed: {spec!r}")
        try:
            raw = self.fetch_data("tokenizers", spec.get("sha256"), url=spec.get("url")) if spec["kind"] == "bpe" else None
            tokenizer = load_tokenizer(raw)
        except TokenizerError as exc:
            raise TaskError(f"the task's tokenizer cannot be used: {exc}") from exc
        except ImportError as exc:
            raise TaskError(f"BPE tasks need tokenizers on this agent (pip install 'agora[hf]'): {exc}") from exc
        if spec.get("vocab_size") is not None and spec["vocab_size"] != tokenizer.vocab_size:
            raise TaskError(f"the task's tokenizer has {tokenizer.vocab_size} ids, not the {spec['vocab_size']} "
                            "the task says")
        data = self.fetch_data("shards", dataset.get("shard_sha256"), url=dataset.get("shard_url"))
        try:
            shard = read_token_shard(data, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.sha256 or "byte",
                                     max_bytes=self.max_dataset_bytes)
        except ShardError as exc:
            raise TaskError(f"shard {dataset['shard_sha256'][:12]}… cannot be used: {exc}") from exc
        guardrails = [g for g in task.get("guardrails") or [] if isinstance(g, dict) and g.get("kind") == "data_filter"]
        try:
            tokens, dropped = shard_filtered_tokens(shard, tokenizer, guardrails)
        except GuardrailError as exc:
            raise TaskError(str(exc)) from exc
        return tokens, {"documents": shard.documents - dropped, "dropped_by_guardrails": dropped,
                        "shard_sha256": dataset["shard_sha256"], "tokenizer": tokenizer.sha256 or "byte"}

    def build_model(self, task: dict, hooks: Hooks):
        """The task's model with the task's weights: ``(model, lora)``, ``lora`` being the task's LoRA
        spec or None. Every way a task's model or weights can be wrong is a :class:`TaskError`."""
        from diloco.checkpoint import CheckpointError, load_weights
        from diloco.models import build_model

        spec = _field(task, "model")
        arch, config = _field(task, "model.arch"), _field(task, "model.config")
        vocab_size = spec.get("vocab_size")
        if not isinstance(config, dict) or (vocab_size is not None and (isinstance(vocab_size, bool)
                                                                        or not isinstance(vocab_size, int))):
            raise TaskError(f"the task's model is malformed: {spec!r}")
        lora = None
        if spec.get("lora") is not None:
            try:
                from diloco.lora import LoraSpec

                lora = LoraSpec.from_dict(spec["lora"], arch=arch)
            except ImportError as exc:
                raise TaskError(f"LoRA tasks need peft on this agent (pip install 'agora[hf]'): {exc}") from exc
            except (TypeError, ValueError) as exc:
                raise TaskError(f"the task's model.lora is invalid: {exc}") from exc
        try:
            model = build_model(arch, dict(config), seed=None, vocab_size=vocab_size)
        except ImportError as exc:
            raise TaskError(f"{arch} models need transformers on this agent (pip install 'agora[hf]'): {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise TaskError(f"this agent cannot build the task's model: {exc}") from exc

        def weights(sha256: str, url: str | None) -> dict:
            data = self.fetch_checkpoint(sha256, url=url, hooks=hooks,
                                         task=task if sha256 == task.get("checkpoint_sha256") else None)
            hooks.check()
            try:
                return load_weights(data)[0]
            except CheckpointError as exc:
                raise TaskError(str(exc)) from exc

        try:
            if lora is None:
                model.load_state_dict(weights(_field(task, "checkpoint_sha256"), task.get("checkpoint_url")),
                                      strict=True)
                return model, None
            from diloco.lora import apply_lora, load_trainable_state

            base = weights(_field(task, "model.lora_base_sha256"), spec.get("lora_base_url"))
            model.load_state_dict(base, strict=True)
            del base
            model = apply_lora(model, lora, seed=int(task.get("seed", 0)))
            load_trainable_state(model, weights(_field(task, "checkpoint_sha256"), task.get("checkpoint_url")))
        except (RuntimeError, ValueError) as exc:
            raise TaskError(f"the checkpoint does not fit model {spec}: {exc}") from exc
        return model, lora

    def run(self, task: dict, hooks: Hooks) -> TaskOutput:
        from diloco.codecs import CODECS
        from diloco.inner import InnerConfig
        from workers.overlap import inner_train_with_head_start

        task_id = _field(task, "id")
        run_id = _field(task, "run_id")
        inner = _field(task, "inner")
        compression = _field(task, "compression")
        if compression not in CODECS:
            raise TaskError(f"unknown compression {compression!r} (this agent knows {', '.join(CODECS)})")
        try:
            cfg = InnerConfig(**{k: inner[k] for k in InnerConfig.__dataclass_fields__ if k in inner})
        except (TypeError, ValueError) as exc:
            raise TaskError(f"the task's inner settings are invalid: {exc}") from exc

        model, lora = self.build_model(task, hooks)

        tokens, data_info = self.load_tokens(task)
        hooks.check()
        if tokens.numel() < cfg.seq_len + 1:
            raise TaskError(f"the data shard has {tokens.numel()} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
        vocab = int(model.config.vocab_size)
        if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
            raise TaskError(f"the data shard has token ids outside the model's vocabulary of {vocab}")
        # A task marked "fresh" (spot re-computation, where another worker repeats the same task) starts AdamW
        # afresh so the two computations are the same; the saved state is replaced after it as usual.
        optimizer_state = None if task.get("optimizer") == "fresh" else self._load_optimizer_state(run_id, model, cfg)
        log.info("task %s: %d inner steps of %s%s on %s (%d tokens of data in %d documents, %d dropped by "
                 "guardrails%s)", task_id, cfg.steps, task["model"]["arch"], f" LoRA r={lora.rank}" if lora else "",
                 self.device, tokens.numel(), data_info["documents"], data_info["dropped_by_guardrails"],
                 ", optimizer state resumed" if optimizer_state else "")

        display = ProgressDisplay(cfg.steps, f"task {task_id}", every_s=self.progress_every_s)

        def progress(step: int, loss: float) -> None:
            display.update(step, loss)
            hooks.on_step(step, cfg.steps, loss)

        try:
            # Plain inner_train, unless an overlap run's next round continues the steps trained ahead.
            result = inner_train_with_head_start(self, task, model, tokens, cfg, seed=int(_field(task, "seed")),
                                                 device=self.device, optimizer_state=optimizer_state,
                                                 progress=progress)
        finally:
            display.close()
        if not (math.isfinite(result.loss_start) and math.isfinite(result.loss_end)):
            raise TaskError(f"training diverged (loss {result.loss_start} -> {result.loss_end})")
        self._save_optimizer_state(run_id, result.optimizer_state)
        from workers.sync import encode_pseudo_gradient

        update = encode_pseudo_gradient(self, task, result.pseudo_gradient)  # error feedback for sparse codecs
        limit = task.get("max_upload_bytes")
        if limit and len(update) > int(limit):
            raise TaskError(f"the encoded update has {len(update)} bytes, over the task's limit of {limit}")
        metrics = {"loss_start": float(result.loss_start), "loss_end": float(result.loss_end),
                   "steps": int(result.steps), "tokens": int(result.tokens), "seconds": round(float(result.seconds), 3),
                   "tokens_per_s": round(float(result.tokens_per_s), 3)}
        return TaskOutput(update=update, metrics=metrics,
                          details={**data_info, "update_bytes": len(update), "device": self.device})
