"""Datasets: loading (built-in, local file, sha256-pinned https), split, shards and batches."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch import Tensor

BUILTIN_SOURCES = ("builtin:python-docs",)
DOCUMENT_SEPARATOR = "\n\n"
MAX_DOWNLOAD_BYTES = 2 * 1024**3
_CHUNK = 1 << 20


class DatasetError(ValueError):
    """A dataset cannot be loaded: unknown source, missing file, download failure, sha256 mismatch."""


def default_cache_dir() -> str:
    return os.environ.get("AGORA_DATASET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "agora", "datasets"
    )


def _split_text(text: str) -> list[str]:
    return [part.strip("\n") for part in text.split(DOCUMENT_SEPARATOR) if part.strip()]


def _check_sha256(data: bytes, sha256: str | None, what: str) -> None:
    if sha256 is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise DatasetError(f"sha256 mismatch for {what}: expected {sha256.lower()}, got {actual}")


def _download(url: str, dest: Path, sha256: str) -> bytes:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as tmp:
            request = urllib.request.Request(url, headers={"User-Agent": "agora-diloco/1"})
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (scheme checked)
                while chunk := response.read(_CHUNK):
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise DatasetError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
                    digest.update(chunk)
                    tmp.write(chunk)
        if digest.hexdigest() != sha256:
            raise DatasetError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}")
        os.replace(tmp_name, dest)
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"could not download {url}: {exc}") from exc
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return dest.read_bytes()


def load_documents(
    source: str,
    sha256: str | None = None,
    cache_dir: str | None = None,
    *,
    _allow_http: bool = False,
) -> list[str]:
    """Load a corpus as a list of documents.

    - ``builtin:python-docs``: the values of ``pydoc_data.topics.topics`` in sorted-key order.
    - ``file:/abs/path``: a UTF-8 text file split into documents on blank lines (``"\\n\\n"``).
    - ``https://...``: downloaded once into ``cache_dir`` (named by its sha256, which is required and
      checked), then split like a file. ``_allow_http`` lets tests use a local plain-http server.

    When ``sha256`` is given it is checked against the raw bytes (for the built-in corpus: the UTF-8
    bytes of the documents joined with blank lines).
    """
    if sha256 is not None:
        if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256):
            raise DatasetError("sha256 must be 64 hexadecimal characters")
        sha256 = sha256.lower()
    if source == "builtin:python-docs":
        from pydoc_data import topics

        docs = [topics.topics[key] for key in sorted(topics.topics)]
        docs = [d for d in docs if d.strip()]
        if sha256 is not None:
            _check_sha256(DOCUMENT_SEPARATOR.join(docs).encode("utf-8"), sha256, source)
        return docs
    if source.startswith("builtin:"):
        raise DatasetError(f"unknown built-in dataset {source!r} (known: {', '.join(BUILTIN_SOURCES)})")
    if source.startswith("file:"):
        path = Path(source[len("file:"):])
        if not path.is_absolute():
            raise DatasetError(f"file dataset path must be absolute: {source!r}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
        _check_sha256(raw, sha256, source)
        return _split_text(raw.decode("utf-8", errors="replace"))
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme == "https" or (scheme == "http" and _allow_http):
        if sha256 is None:
            raise DatasetError("an https dataset must be pinned by its sha256")
        dest = Path(cache_dir or default_cache_dir()) / f"{sha256}.txt"
        raw = dest.read_bytes() if dest.exists() else None
        if raw is None or hashlib.sha256(raw).hexdigest() != sha256:
            raw = _download(source, dest, sha256)
        return _split_text(raw.decode("utf-8", errors="replace"))
    raise DatasetError(f"unsupported dataset source {source!r} (use builtin:python-docs, file:/abs/path or https://)")


def split_documents(docs: list[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split of documents; both keep the original document order.

    The held-out part has ``round(len(docs) * heldout_fraction)`` documents, at least one when the
    fraction is positive and there are two or more documents, and never all of them.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), not {heldout_fraction}")
    n = len(docs)
    n_held = round(n * heldout_fraction)
    if heldout_fraction > 0 and n >= 2:
        n_held = max(n_held, 1)
    n_held = min(n_held, max(n - 1, 0))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    train = [d for i, d in enumerate(docs) if i not in held]
    heldout = [d for i, d in enumerate(docs) if i in held]
    return train, heldout


def shard_assignment(docs: list[str], count: int) -> list[int]:
    """Shard index of every document: largest documents first, each to the lightest shard (by bytes).

    Balances tokens across shards; the first ``count`` documents land on distinct empty shards, so
    every shard is non-empty when there are at least ``count`` documents.
    """
    if count < 1:
        raise ValueError(f"shard count must be >= 1, not {count}")
    sizes = [len(d.encode("utf-8")) for d in docs]
    load = [0] * count
    owner = [0] * len(docs)
    for i in sorted(range(len(docs)), key=lambda i: (-sizes[i], i)):
        shard = min(range(count), key=lambda s: (load[s], s))
        owner[i] = shard
        load[shard] += sizes[i] + 1
    return owner


def shard_documents(docs: list[str], index: int, count: int) -> list[str]:
    """Shard ``index`` of ``count``: disjoint, covering, balanced by bytes, in the original order."""
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), not {index}")
    owner = shard_assignment(docs, count)
    return [d for d, s in zip(docs, owner, strict=True) if s == index]


def encode_documents(docs: list[str]) -> Tensor:
    """UTF-8 bytes of the documents joined with a blank line, as a 1-D LongTensor."""
    raw = DOCUMENT_SEPARATOR.join(docs).encode("utf-8")
    if not raw:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.long)


def sample_batch(
    tokens: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows: inputs ``x`` and next-byte targets ``y``, both ``(batch_size, seq_len)``."""
    if tokens.numel() < seq_len + 1:
        raise DatasetError(f"corpus has {tokens.numel()} tokens, needs at least seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]
