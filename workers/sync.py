"""What the agent keeps from round to round of a run: the checkpoint it holds (rebuilt from the server's
published step when it can) and its error-feedback buffer.

- Checkpoints: a task names ``checkpoint_sha256`` and, when the server published the step that made it,
  ``delta_from_sha256`` + ``delta_sha256``. An agent that holds ``delta_from_sha256`` in its cache downloads
  only that step (``GET /api/v1/checkpoints/<sha256>/delta``), applies it
  (``diloco.sparse.apply_published_delta``: θ_new = θ_old − d, float32, bitwise the server's), writes the
  checkpoint with the metadata the step carries and checks its sha256. On any mismatch, or a gap (it does
  not hold ``delta_from_sha256``: it missed a round or just started), it downloads the full checkpoint.
  The cache keeps the newest ``KEEP_CHECKPOINTS`` checkpoints.
- Error feedback (SparseLoCo): for a task whose compression is a sparse codec, the pseudo-gradient is folded
  into the run's buffer (``diloco.sparse.ErrorFeedback``, cut into chunks of the task's ``sparse_chunk``), the
  sparse update is what the buffer sends, and what it leaves out is kept for the next round: in memory, and
  in ``<cache>/optim/<run_id>.error-feedback.safetensors`` beside the inner optimizer state for a restart
  (``workers.keep``).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from workers.client import ClientError

log = logging.getLogger("agora.worker.sync")

KEEP_CHECKPOINTS = 4
SPARSE_CHUNK_FALLBACK = 4096  # the chunk of a task without a valid sparse_chunk (what agents always used before)
_HEX = frozenset("0123456789abcdef")


def _is_sha(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _cached(runner, sha256: str) -> bytes | None:
    from diloco.checkpoint import sha256_hex

    path = runner.checkpoint_file(sha256)
    if not path.exists():
        return None
    data = path.read_bytes()
    if sha256_hex(data) == sha256:
        return data
    log.warning("cached checkpoint %s… is corrupt; it is fetched again", sha256[:12])
    path.unlink(missing_ok=True)
    return None


def _store(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prune_checkpoints(folder: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Delete all but the ``keep`` most recently used checkpoints in ``folder``."""
    try:
        files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in files[keep:]:
        old.unlink(missing_ok=True)


def rebuild_from_delta(runner, task: dict, hooks=None) -> bytes | None:
    """The task's checkpoint rebuilt from the cached previous one and the published step, or None when it
    cannot be (no step, a gap, a download error, a mismatch): the caller downloads the checkpoint then."""
    from diloco.checkpoint import CheckpointError, load_weights, save_weights, sha256_hex
    from diloco.codecs import CodecError
    from diloco.sparse import apply_published_delta, published_meta

    sha, base, step_sha = task.get("checkpoint_sha256"), task.get("delta_from_sha256"), task.get("delta_sha256")
    if not (_is_sha(sha) and _is_sha(base) and _is_sha(step_sha)):
        return None
    base_data = _cached(runner, base)
    if base_data is None:
        log.info("no published step applies: this agent does not hold checkpoint %s… (a missed round)", base[:12])
        return None
    try:
        step = runner.client.download_delta(sha, max_bytes=len(base_data))
        if hooks is not None:
            hooks.check()
        if sha256_hex(step) != step_sha:
            raise CodecError(f"the published step arrived with sha256 {sha256_hex(step)}, not {step_sha}")
        meta = published_meta(step)
        if meta.get("from") != base or meta.get("to") != sha or not isinstance(meta.get("checkpoint_meta"), dict):
            raise CodecError(f"the published step goes from {meta.get('from')} to {meta.get('to')}")
        state = apply_published_delta(load_weights(base_data)[0], step)
        data = save_weights(state, meta["checkpoint_meta"])
    except (ClientError, CodecError, CheckpointError, ValueError) as exc:
        log.warning("the published step to %s… cannot be used (%s); downloading the checkpoint", sha[:12], exc)
        return None
    if sha256_hex(data) != sha:
        log.warning("the checkpoint rebuilt from the published step has sha256 %s…, not %s…; downloading it",
                    sha256_hex(data)[:12], sha[:12])
        return None
    _store(runner.checkpoint_file(sha), data)
    log.info("checkpoint %s… rebuilt from the published step (%d bytes instead of %d)", sha[:12], len(step),
             len(data))
    return data


def fetch_task_checkpoint(runner, task: dict, sha256: str, hooks=None) -> bytes | None:
    """The task's checkpoint from the cache or rebuilt from the published step; None means download it.
    Sets ``runner.checkpoint_via`` to ``cache``, ``delta`` or ``full`` (the last when None is returned)."""
    sha256 = sha256.lower()
    data = _cached(runner, sha256)
    if data is not None:
        runner.checkpoint_via = "cache"
        runner.checkpoint_file(sha256).touch()
        return data
    data = rebuild_from_delta(runner, task, hooks)
    runner.checkpoint_via = "delta" if data is not None else "full"
    prune_checkpoints(runner.checkpoint_file(sha256).parent, KEEP_CHECKPOINTS - (0 if data is not None else 1))
    return data


# --- error feedback ---------------------------------------------------------------------------------------


def error_feedback_file(runner, run_id) -> Path:
    return runner.cache_dir / "optim" / f"{int(run_id)}.error-feedback.safetensors"


def task_sparse_chunk(task: dict) -> int:
    """The chunk a sparse update is cut into: the task's ``sparse_chunk`` when it is one of
    ``diloco.codecs.SPARSE_CHUNKS``, else (a server from before the setting, or a value no decoder accepts)
    ``SPARSE_CHUNK_FALLBACK``, with a warning for a value that is there but wrong."""
    from diloco.codecs import SPARSE_CHUNKS

    chunk = task.get("sparse_chunk")
    if chunk is None:
        return SPARSE_CHUNK_FALLBACK
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk not in SPARSE_CHUNKS:
        log.warning("task %s: sparse_chunk %.40r is not one of %s; using %d", task.get("id"), chunk,
                    ", ".join(map(str, SPARSE_CHUNKS)), SPARSE_CHUNK_FALLBACK)
        return SPARSE_CHUNK_FALLBACK
    return chunk


def encode_pseudo_gradient(runner, task: dict, delta: dict) -> bytes:
    """The update to upload for ``delta``: through the run's error-feedback buffer for a sparse codec
    (kept on disk for the next round), else the codec itself."""
    from diloco.codecs import SPARSE_BITS, CodecError, encode_update, reference_of

    compression = task["compression"]
    if compression not in SPARSE_BITS:
        return encode_update(delta, compression)
    from diloco.codecs import DENSITY
    from diloco.sparse import BETA, ErrorFeedback

    density = task.get("density", DENSITY)
    path = error_feedback_file(runner, task["run_id"])
    beta = task.get("error_feedback_beta")
    ef = ErrorFeedback(codec=compression, density=density, beta=BETA if beta is None else beta,
                       chunk=task_sparse_chunk(task))
    kept = runner.keeper.get(path, task["run_id"])  # this process's buffer from the run's last round
    if kept is None and path.exists():
        try:
            loaded = ErrorFeedback.load(path.read_bytes(), reference_of(delta))
            kept = (loaded.error, loaded.rounds)
        except (CodecError, OSError, ValueError) as exc:  # a stale or damaged buffer must not fail the task
            log.warning("discarding the error-feedback buffer of run %s (%s)", task["run_id"], exc)
            path.unlink(missing_ok=True)
    if kept is not None:
        # The task's codec settings, the buffer kept: it is dense, so it carries over whatever the chunk.
        ef.error, ef.rounds = kept
    try:
        data = ef.encode(delta)
    except ValueError as exc:  # names or shapes differ from the buffer's: begin it afresh
        log.warning("discarding the error-feedback buffer of run %s (%s)", task["run_id"], exc)
        ef.error, ef.rounds = None, 0
        data = ef.encode(delta)
    # Kept in memory for the next round and written behind the upload (``workers.keep``): the file of the
    # last round goes at once, so a crash leaves no buffer rather than one whose values were already sent.
    runner.keeper.put(path, (ef.error, ef.rounds), ef.save, run_id=task["run_id"])
    return data
