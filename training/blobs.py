"""Blob storage and the in-process caches of tensors derived from blobs.

Checkpoints, worker updates and outer optimizer states live in ``storages["checkpoints"]`` (local disk
or S3). Checkpoints are content addressed, so a cache keyed by sha256 can never be stale; the caches
here are small LRUs so a long-lived process (Celery worker, web server) keeps at most a few models.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from torch import Tensor

from diloco.checkpoint import load_weights, sha256_hex
from diloco.codecs import reference_of
from diloco.data import SourcePolicy, encode_documents, load_documents, split_documents
from diloco.models import build_model

_WRITE_CHUNK = 8 * 2**20


def store():
    return storages["checkpoints"]


def blob_write(name: str, data: bytes, *, content_addressed: bool = False) -> None:
    """Write ``data`` at exactly ``name``. A content-addressed blob that already exists is left alone."""
    st = store()
    if st.exists(name):
        if content_addressed:
            return
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


def blob_read(name: str) -> bytes:
    with store().open(name, "rb") as fh:
        return fh.read()


def blob_delete(name: str) -> None:
    try:
        store().delete(name)
    except OSError:
        pass


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
                return self._data[key]
        value = loader()
        self.put(key, value)
        return value

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_states = LRU(4)
_models = LRU(2)
_outer_states = LRU(2)


class CheckpointCorrupt(Exception):
    pass


def checkpoint_bytes(sha256: str) -> bytes:
    from training.models import checkpoint_storage_name

    data = blob_read(checkpoint_storage_name(sha256))
    if sha256_hex(data) != sha256:
        raise CheckpointCorrupt(f"checkpoint {sha256} does not match its hash")
    return data


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
    _reference.cache_clear()
    _heldout.cache_clear()
