"""Blob storage and the in-process caches of tensors derived from blobs.

Checkpoints, worker updates and outer optimizer states live in ``storages["checkpoints"]`` (local disk
or S3). Checkpoints are content addressed, so a cache keyed by sha256 can never be stale; the caches
here are small LRUs so a long-lived process (Celery worker, web server) keeps at most a few models.

A blob is never seen half written. On local disk it is written to a temporary name beside its final one
(``.<name>.<random>.part``), flushed, fsynced and renamed into place (``os.replace``, atomic on POSIX);
a process killed mid-write leaves only the temporary file. The writer holds an exclusive ``flock`` on it
until the rename, so a sweeper can tell a dead write (lock free) from a live one: every write sweeps its
own folder, and ``blob_sweep_temp`` (``manage.py sweep_blobs``) the whole store. Object stores (S3) make an
object visible only once its upload completes, which is the same guarantee.

A write given the blob's sha256 reads the stored bytes back and checks them before it returns, so a row
that names a blob is committed only after the blob is known good; a content-addressed write that finds
its name taken checks the bytes already there and replaces them if they do not match (a truncated file
left by an older build). Reads that know the hash check it too: a mismatching blob raises ``BlobCorrupt``
and is never served.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from torch import Tensor

from diloco.checkpoint import load_weights, sha256_hex
from diloco.codecs import reference_of
from diloco.data import SourcePolicy, encode_documents, load_documents, split_documents
from diloco.models import build_model

log = logging.getLogger(__name__)

_WRITE_CHUNK = 8 * 2**20
_HASH_CHUNK = 8 * 2**20
TEMP_SUFFIX = ".part"
# A temporary file untouched this long whose lock is free belongs to a write that died. (The grace covers
# the instant between creating the file and locking it.)
TEMP_GRACE_S = 60
# One untouched this long is removed even if it looks locked (a filesystem without working locks).
STALE_TEMP_S = 15 * 60
# A download re-hashes a file it already verified (same inode, size and modification time) only after
# this long, so a popular checkpoint is hashed once per process per interval, not once per agent.
VERIFIED_TTL_S = 10 * 60


class BlobCorrupt(Exception):
    """A stored blob's bytes do not hash to the sha256 its row records."""

    def __init__(self, name: str, expected: str, actual: str):
        self.name, self.expected, self.actual = name, expected, actual
        super().__init__(f"blob {name} does not match its sha256 {expected} (its bytes hash to {actual})")


class CheckpointCorrupt(BlobCorrupt):
    pass


def store():
    return storages["checkpoints"]


def _local_path(st, name: str) -> Path | None:
    """The file behind ``name`` when the storage is a local filesystem, else None."""
    try:
        return Path(st.path(name))
    except NotImplementedError:
        return None


def _hash_file(fh) -> tuple[str, int]:
    """(sha256, length) of an open binary file from its current position to its end."""
    digest = hashlib.sha256()
    length = 0
    while chunk := fh.read(_HASH_CHUNK):
        digest.update(chunk)
        length += len(chunk)
    return digest.hexdigest(), length


def blob_sha256(name: str) -> str:
    """The sha256 of the bytes stored at ``name`` (raises ``FileNotFoundError`` / ``OSError``)."""
    with store().open(name, "rb") as fh:
        return _hash_file(fh)[0]


def blob_write(name: str, data: bytes, *, content_addressed: bool = False, sha256: str | None = None) -> None:
    """Write ``data`` at exactly ``name``, atomically: readers see the old blob or the whole new one.

    ``sha256`` (computed here when ``content_addressed`` and not given) is checked against the stored
    bytes before returning; on a mismatch the blob is removed and ``BlobCorrupt`` raised, so callers
    commit rows that name a blob only once it is known good. A content-addressed blob already stored
    with the right bytes is left alone; one with other bytes (a truncated write) is replaced.
    Raises ``OSError`` when storage fails; a failed write never leaves part of ``data`` under ``name``.
    """
    if content_addressed and sha256 is None:
        sha256 = sha256_hex(data)
    st = store()
    path = _local_path(st, name)
    if path is not None:
        written = _write_local(st, path, data, content_addressed=content_addressed, sha256=sha256)
    else:
        written = _write_object(st, name, data, content_addressed=content_addressed, sha256=sha256)
    if written and sha256 is not None:
        _verify_written(st, name, path, sha256)


def _write_local(st, path: Path, data: bytes, *, content_addressed: bool, sha256: str | None) -> bool:
    """Temporary file, fsync, rename into place, fsync the folder. False when nothing needed writing."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    _sweep_folder(folder, STALE_TEMP_S)
    if content_addressed and path.exists():
        try:
            with open(path, "rb") as fh:
                existing = _hash_file(fh)[0]
        except FileNotFoundError:
            existing = None
        if existing == sha256:
            return False
        if existing is not None:
            log.warning("blob %s on disk hashes to %s, not %s: writing it again", path.name, existing, sha256)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # "this write is alive", until the file is closed
            # One write call: the copy runs in the kernel without the GIL, so an evaluation running beside
            # it in another thread is not starved.
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            mode = st.file_permissions_mode
            os.chmod(tmp, 0o644 if mode is None else mode)
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a crash right after must not bring back the old name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_object(st, name: str, data: bytes, *, content_addressed: bool, sha256: str | None) -> bool:
    """Object stores publish an object only once its upload is complete: no temporary name needed."""
    if st.exists(name):
        if content_addressed:
            try:
                existing = blob_sha256(name)
            except FileNotFoundError:
                existing = None
            if existing == sha256:
                return False
            log.warning("blob %s in storage hashes to %s, not %s: writing it again", name, existing, sha256)
        st.delete(name)
    content = ContentFile(data)
    # Storage backends copy in chunks; Django's 64 kB default means thousands of GIL-holding round trips
    # for a checkpoint, which starve an evaluation running alongside in another thread.
    content.DEFAULT_CHUNK_SIZE = _WRITE_CHUNK
    saved = st.save(name, content)
    if saved != name:  # a concurrent writer won the name; for content-addressed blobs the bytes are the same
        st.delete(saved)
        if not content_addressed:
            raise OSError(f"could not write blob {name}: the name is taken")
    return True


def _verify_written(st, name: str, path: Path | None, sha256: str) -> None:
    with (open(path, "rb") if path is not None else st.open(name, "rb")) as fh:
        actual = _hash_file(fh)[0]
    if actual != sha256:
        log.error("blob %s hashes to %s after writing, not %s: removed", name, actual, sha256)
        blob_delete(name)
        raise BlobCorrupt(name, sha256, actual)


def blob_read(name: str, *, sha256: str | None = None) -> bytes:
    """The bytes at ``name``; when ``sha256`` is given they must hash to it (else ``BlobCorrupt``)."""
    with store().open(name, "rb") as fh:
        data = fh.read()
    if sha256 is not None:
        actual = sha256_hex(data)
        if actual != sha256:
            log.error("blob %s hashes to %s, not %s: not used", name, actual, sha256)
            raise BlobCorrupt(name, sha256, actual)
    return data


def blob_delete(name: str) -> None:
    try:
        store().delete(name)
    except OSError:
        pass


def blob_open_verified(name: str, sha256: str):
    """``(open binary file, length)`` for streaming a blob whose bytes were checked against ``sha256``.

    The length is the file's, not a row's. The check reads the whole file once, and again only after
    ``VERIFIED_TTL_S`` or when the file changed (local disk: inode, size, modification time; object
    stores: size and ETag). Raises ``BlobCorrupt`` (logged) on a mismatch, ``FileNotFoundError`` when the blob is
    missing, another ``OSError`` when storage fails. The caller closes the file.
    """
    st = store()
    path = _local_path(st, name)
    if path is not None:
        fh = open(path, "rb")
        stat = os.fstat(fh.fileno())
        key = ("file", str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        length = stat.st_size
    else:
        fh = st.open(name, "rb")
        length = fh.size
        # S3 objects carry an ETag that changes whenever the object is written again.
        key = ("object", name, length, getattr(getattr(fh, "obj", None), "e_tag", None))
    try:
        if _verified.get(key, max_age=VERIFIED_TTL_S) != sha256:
            actual, length = _hash_file(fh)
            if actual != sha256:
                log.error("blob %s hashes to %s, not %s: refusing to serve it", name, actual, sha256)
                raise BlobCorrupt(name, sha256, actual)
            _verified.put(key, sha256)
            fh.seek(0)
    except BaseException:
        fh.close()
        raise
    return fh, length


def blob_sweep_temp(*, older_than_s: float = STALE_TEMP_S) -> list[str]:
    """Remove the temporary files of blob writes that died (local storage only); returns their paths.

    A file goes once no live writer holds its lock and it is ``TEMP_GRACE_S`` old, or, lock or not, once
    it is ``older_than_s`` old. Safe to run at any time beside live writers. Object stores keep no
    temporary objects (an S3 bucket should abort incomplete multipart uploads with a lifecycle rule)."""
    root = _local_path(store(), "")
    if root is None or not root.is_dir():
        return []
    removed: list[str] = []
    for folder, _dirs, _files in os.walk(root):
        removed += _sweep_folder(Path(folder), older_than_s)
    return removed


def _sweep_folder(folder: Path, older_than_s: float) -> list[str]:
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            idle = now - entry.stat(follow_symlinks=False).st_mtime
            if idle >= older_than_s or (idle >= min(TEMP_GRACE_S, older_than_s) and not _write_alive(entry.path)):
                os.unlink(entry.path)
                removed.append(entry.path)
                log.info("removed %s, left by a blob write that did not finish", entry.path)
        except OSError:
            pass  # another sweeper got there first, or the write just finished
    return removed


def _write_alive(path: str) -> bool:
    """Whether a writer still holds the lock on a temporary file (it is released when the writer dies)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class LRU:
    """A tiny thread-safe LRU cache; ``get_or_load`` may run the loader twice under a race (harmless)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or_load(self, key, loader: Callable):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key][0]
        value = loader()
        self.put(key, value)
        return value

    def get(self, key, *, max_age: float | None = None):
        """The value under ``key``, or None when absent (or put more than ``max_age`` seconds ago)."""
        with self._lock:
            item = self._data.get(key)
            if item is None or (max_age is not None and time.monotonic() - item[1] > max_age):
                return None
            self._data.move_to_end(key)
            return item[0]

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = (value, time.monotonic())
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_states = LRU(4)
_models = LRU(2)
_outer_states = LRU(2)
_verified = LRU(64)


def checkpoint_bytes(sha256: str) -> bytes:
    """A checkpoint's bytes, checked against its sha256 (``CheckpointCorrupt``, logged, when they differ)."""
    from training.models import checkpoint_storage_name

    name = checkpoint_storage_name(sha256)
    try:
        return blob_read(name, sha256=sha256)
    except BlobCorrupt as exc:
        raise CheckpointCorrupt(exc.name, exc.expected, exc.actual) from None


def checkpoint_state(sha256: str) -> tuple[dict[str, Tensor], dict]:
    """Weights and metadata of a checkpoint, cached by sha256. Callers must not modify the tensors."""
    return _states.get_or_load(sha256, lambda: load_weights(checkpoint_bytes(sha256)))


def remember_state(sha256: str, state: dict[str, Tensor], meta: dict) -> None:
    """Put weights we just wrote into the cache, so the next round does not read them back."""
    _states.put(sha256, (state, meta))


def outer_state(name: str) -> dict[str, Tensor]:
    """A run's outer optimizer state blob as tensors, cached by name (each name is written once).
    Callers must not modify the tensors."""
    return _outer_states.get_or_load(name, lambda: load_weights(blob_read(name))[0])


def remember_outer_state(name: str, tensors: dict[str, Tensor]) -> None:
    """Cache the outer state we just wrote, so the next round does not read it back."""
    _outer_states.put(name, tensors)


def checkpoint_model(sha256: str) -> torch.nn.Module:
    """An eval-mode model with the checkpoint's weights (for the playground), cached by sha256."""

    def load():
        state, meta = checkpoint_state(sha256)
        model = build_model(meta["arch"], meta["config"])
        model.load_state_dict(state)
        model.eval()
        return model

    return _models.get_or_load(sha256, load)


@functools.lru_cache(maxsize=8)
def _reference(arch: str, config_json: str):
    from diloco.models import init_state

    return reference_of(init_state(arch, json.loads(config_json), 0))


def model_reference(arch: str, config: dict):
    """``{name: (shape, dtype)}`` every update for this architecture must match."""
    return _reference(arch, json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _heldout(source: str, sha256: str | None, fraction: float, cache_dir: str, policy: SourcePolicy) -> Tensor:
    docs = load_documents(source, sha256, cache_dir=cache_dir, policy=policy)
    return encode_documents(split_documents(docs, fraction)[1])


def dataset_policy() -> SourcePolicy:
    """Where the server may read datasets from: files under AGORA_DATA_ROOT, public https, a byte cap."""
    from django.conf import settings

    return SourcePolicy(data_root=str(settings.AGORA_DATA_ROOT), max_bytes=int(settings.AGORA_MAX_DATASET_BYTES))


def heldout_tokens(dataset: dict) -> Tensor:
    """The held-out split of a run's dataset (the same split the agents leave out), as tokens.

    Raises ``diloco.data.DatasetError`` naming the source when the server's policy refuses it.
    """
    from django.conf import settings

    return _heldout(dataset["source"], dataset.get("sha256"), float(dataset.get("heldout_fraction", 0.1)),
                    str(settings.VAR_DIR / "datasets"), dataset_policy())


def clear_caches() -> None:
    _states.clear()
    _models.clear()
    _outer_states.clear()
    _verified.clear()
    _reference.cache_clear()
    _heldout.cache_clear()
