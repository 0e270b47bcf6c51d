"""Datasets: loading (built-in, local file, sha256-pinned https), split, shards and batches.

Sources come from proposals anyone can write, and the server and the agents read them, so loading is
fenced in by a :class:`SourcePolicy` (the caller passes its settings in; ``diloco`` reads none):

- ``file:/abs/path`` is read only when it resolves (symlinks and ``..`` followed) to a regular file under
  the policy's ``data_root``; with no data root, file sources are refused. Devices, FIFOs and
  directories are refused, and so is anything over ``max_bytes``.
- ``https://`` is fetched only from public addresses: the host is resolved, every address it resolves
  to must be public (not private, loopback, link-local, multicast, reserved, unspecified, IPv4-mapped or
  a tunnel/translation prefix), and the connection goes to the address that was checked (no second DNS
  lookup to rebind). Redirects are followed by hand, each hop checked the same way; the body is capped
  at ``max_bytes`` while it streams and must match the pinned sha256.
- ``builtin:python-docs`` needs neither. Every other scheme (``http:`` included) is refused.

Every refusal is a :class:`DatasetError` whose message names the source.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import math
import os
import random
import socket
import ssl
import stat
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

BUILTIN_SOURCES = ("builtin:python-docs",)
DOCUMENT_SEPARATOR = "\n\n"
DEFAULT_MAX_DATASET_BYTES = 256 * 1024**2
MAX_REDIRECTS = 5
_CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)


class DatasetError(ValueError):
    """A dataset cannot be loaded: unknown or refused source, missing file, download failure, sha256 mismatch."""


def address_is_public(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an IP address belongs to the public internet (what a dataset download may connect to).

    ``is_global`` alone is not enough on every Python: multicast and some IPv6 prefixes that embed an
    IPv4 address (6to4, NAT64, IPv4-mapped, Teredo) pass it, and can lead back to a private network.
    """
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id or addr.ipv4_mapped or addr.sixtofour or addr.teredo:
            return False
        if addr in ipaddress.ip_network("64:ff9b::/96") or addr in ipaddress.ip_network("64:ff9b:1::/48"):
            return False
    return (addr.is_global and not addr.is_multicast and not addr.is_private and not addr.is_loopback
            and not addr.is_link_local and not addr.is_reserved and not addr.is_unspecified)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver), in the order to try them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise OSError(f"cannot resolve {host}: {exc}") from exc
    return list(dict.fromkeys(info[4][0] for info in infos))


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``host`` (SNI, certificate check and Host header) over a socket to one checked address."""

    def __init__(self, host: str, port: int, *, address: str, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def open_https(*, address: str, host: str, port: int, target: str, timeout: float,
               context: ssl.SSLContext | None = None):
    """GET ``target`` from ``host`` over a connection to ``address``; an ``http.client.HTTPResponse``."""
    conn = _PinnedHTTPSConnection(host, port, address=address, context=context or ssl.create_default_context(),
                                  timeout=timeout)
    try:
        conn.request("GET", target, headers={"User-Agent": "agora-diloco/1", "Accept-Encoding": "identity"})
        response = conn.getresponse()
    except BaseException:
        conn.close()
        raise
    response._agora_connection = conn  # closed with the response
    return response


@dataclass(frozen=True)
class SourcePolicy:
    """Where datasets may come from on this machine, and how much of one may be read.

    ``resolve`` and ``open`` are the network seams (tests inject a resolver that answers with a private
    address, or a transport that redirects); production uses the defaults.
    """

    data_root: str | None = None
    max_bytes: int = DEFAULT_MAX_DATASET_BYTES
    resolve: Callable[[str, int], list[str]] | None = None  # None: resolve_host
    open: Callable[..., object] | None = None  # None: open_https
    timeout: float = 60.0
    max_redirects: int = MAX_REDIRECTS


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


# --- file: ---------------------------------------------------------------------------------------


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _read_file(source: str, policy: SourcePolicy) -> bytes:
    """The bytes of a ``file:`` source that resolves to a regular file under the data root."""
    path = source[len("file:"):]
    if not path.startswith("/"):
        raise DatasetError(f"dataset source {source!r}: a file path must be absolute")
    if "\x00" in path:
        raise DatasetError(f"dataset source {source!r}: the path contains a NUL byte")
    if not policy.data_root:
        raise DatasetError(f"dataset source {source!r} refused: file sources are not allowed here "
                           "(no data root is configured)")
    root = os.path.realpath(policy.data_root)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset source {source!r}: the data root {root} is not a directory")
    real = os.path.realpath(path)
    if not _inside(root, real) or real == root:
        raise DatasetError(f"dataset source {source!r} refused: it resolves outside the data root {root}")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)  # O_NONBLOCK: a FIFO must not hang the open
    except OSError as exc:
        raise DatasetError(f"dataset source {source!r}: cannot read it: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatasetError(f"dataset source {source!r} refused: not a regular file")
        linked = f"/proc/self/fd/{fd}"
        if os.path.islink(linked) and not _inside(root, os.path.realpath(linked)):
            raise DatasetError(f"dataset source {source!r} refused: it resolves outside the data root {root}")
        if info.st_size > policy.max_bytes:
            raise DatasetError(f"dataset source {source!r} refused: {info.st_size} bytes, "
                               f"over the limit of {policy.max_bytes}")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while chunk := os.read(fd, _CHUNK):
            size += len(chunk)
            if size > policy.max_bytes:
                raise DatasetError(f"dataset source {source!r} refused: more than {policy.max_bytes} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise DatasetError(f"dataset source {source!r}: cannot read it: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return b"".join(chunks)


# --- https: --------------------------------------------------------------------------------------


def _https_parts(url: str, source: str) -> tuple[str, int, str]:
    """(host, port, request target) of an https URL, or DatasetError naming the source."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise DatasetError(f"dataset source {source!r}: not a valid URL ({url}): {exc}") from None
    where = "" if url == source else f" (redirected to {url})"
    if parts.scheme.lower() != "https":
        raise DatasetError(f"dataset source {source!r} refused{where}: only https URLs may be fetched")
    if parts.username is not None or parts.password is not None:
        raise DatasetError(f"dataset source {source!r} refused{where}: credentials in the URL")
    host = parts.hostname
    if not host or any(c in url for c in "\x00\r\n\t "):
        raise DatasetError(f"dataset source {source!r}{where}: not a valid URL")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise DatasetError(f"dataset source {source!r}{where}: not a valid host name") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return host, port, target


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _public_addresses(host: str, port: int, source: str, url: str, policy: SourcePolicy) -> list[str]:
    where = "" if url == source else f" (redirected to {url})"
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = list((policy.resolve or resolve_host)(host, port))
        except OSError as exc:
            raise DatasetError(f"dataset source {source!r}{where}: {exc}") from exc
        if not addresses:
            raise DatasetError(f"dataset source {source!r}{where}: {host} resolves to no address")
    private = [a for a in addresses if not address_is_public(a)]
    if private:
        raise DatasetError(f"dataset source {source!r} refused{where}: {host} resolves to "
                           f"non-public address {private[0]}")
    return addresses


def _open_checked(url: str, source: str, policy: SourcePolicy):
    host, port, target = _https_parts(url, source)
    last_error: Exception | None = None
    for address in _public_addresses(host, port, source, url, policy):
        try:
            return (policy.open or open_https)(address=address, host=host, port=port, target=target,
                                               timeout=policy.timeout)
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
    raise DatasetError(f"could not download dataset source {source!r}: {last_error}")


def _close(response) -> None:
    response.close()
    conn = getattr(response, "_agora_connection", None)
    if conn is not None:
        conn.close()


def _download(source: str, dest: Path, sha256: str, policy: SourcePolicy) -> bytes:
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = source
    for _hop in range(policy.max_redirects + 1):
        response = _open_checked(url, source, policy)
        try:
            status = int(response.status)
            if status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise DatasetError(f"dataset source {source!r}: redirect {status} without a Location")
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if status != 200:
                raise DatasetError(f"could not download dataset source {source!r}: the server answered {status}")
            return _stream_to(response, dest, source, sha256, policy)
        finally:
            _close(response)
    raise DatasetError(f"dataset source {source!r} refused: more than {policy.max_redirects} redirects")


def _stream_to(response, dest: Path, source: str, sha256: str, policy: SourcePolicy) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise DatasetError(f"dataset source {source!r} refused: {int(length)} bytes, "
                           f"over the limit of {policy.max_bytes}")
    digest = hashlib.sha256()
    chunks, size = [], 0
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as tmp:
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > policy.max_bytes:
                    raise DatasetError(f"dataset source {source!r} refused: more than {policy.max_bytes} bytes")
                digest.update(chunk)
                tmp.write(chunk)
                chunks.append(chunk)
        if digest.hexdigest() != sha256:
            raise DatasetError(f"sha256 mismatch for {source}: expected {sha256}, got {digest.hexdigest()}")
        os.replace(tmp_name, dest)
    except (OSError, http.client.HTTPException) as exc:
        raise DatasetError(f"could not download dataset source {source!r}: {exc}") from exc
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return b"".join(chunks)


def _read_cached(dest: Path, sha256: str, policy: SourcePolicy) -> bytes | None:
    try:
        if not dest.is_file() or dest.stat().st_size > policy.max_bytes:
            return None
        raw = dest.read_bytes()
    except OSError:
        return None
    return raw if hashlib.sha256(raw).hexdigest() == sha256 else None


DATASET_FORMATS = ("text", "jsonl", "parquet")
# A parquet file names its uncompressed size; a file that would inflate past this many times the byte
# limit is refused before it is decompressed.
PARQUET_INFLATION_LIMIT = 8


def parse_documents(raw: bytes, *, format: str = "text", field: str | None = None, source: str = "dataset",
                    max_bytes: int = DEFAULT_MAX_DATASET_BYTES) -> list[str]:
    """The documents in a dataset file's bytes.

    - ``text``: UTF-8 (bad bytes replaced), split on blank lines.
    - ``jsonl``: one JSON object per line; its string ``field`` is a document. Blank lines are skipped; a
      line that is not an object, lacks the field or holds a non-string there is an error naming the line.
    - ``parquet``: the string ``column`` (``field``) of every row; nulls and empty strings are skipped.

    Empty and whitespace-only documents are dropped in every format.
    """
    if format == "text":
        return _split_text(raw.decode("utf-8", errors="replace"))
    if format == "jsonl":
        return _parse_jsonl(raw, field, source)
    if format == "parquet":
        return _parse_parquet(raw, field, source, max_bytes)
    raise DatasetError(f"dataset source {source!r}: unknown format {format!r} (known: {', '.join(DATASET_FORMATS)})")


def _parse_jsonl(raw: bytes, field: str | None, source: str) -> list[str]:
    from diloco import safejson

    if not field:
        raise DatasetError(f"dataset source {source!r}: a jsonl dataset needs the name of its text field")
    docs = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            value = safejson.loads(line, max_depth=16, what=f"line {number}")
        except safejson.JsonRefused as exc:
            raise DatasetError(f"dataset source {source!r} line {number}: {exc.reason}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise DatasetError(f"dataset source {source!r} line {number}: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise DatasetError(f"dataset source {source!r} line {number}: expected a JSON object, "
                               f"got {type(value).__name__}")
        if field not in value:
            raise DatasetError(f"dataset source {source!r} line {number}: no field {field!r}")
        text = value[field]
        if not isinstance(text, str):
            raise DatasetError(f"dataset source {source!r} line {number}: field {field!r} is "
                               f"{type(text).__name__}, not a string")
        if text.strip():
            docs.append(text)
    return docs


def _parse_parquet(raw: bytes, column: str | None, source: str, max_bytes: int) -> list[str]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    if not column:
        raise DatasetError(f"dataset source {source!r}: a parquet dataset needs the name of its text column")
    try:
        pf = pq.ParquetFile(io.BytesIO(raw))
        schema = pf.schema_arrow
        meta = pf.metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(f"dataset source {source!r}: not a readable parquet file ({exc})") from None
    if column not in schema.names:
        raise DatasetError(f"dataset source {source!r}: no column {column!r} (columns: "
                           f"{', '.join(schema.names[:20]) or 'none'})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DatasetError(f"dataset source {source!r}: column {column!r} holds {kind}, not strings")
    inflated = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if inflated > max_bytes * PARQUET_INFLATION_LIMIT:
        raise DatasetError(f"dataset source {source!r} refused: it decompresses to {inflated} bytes, over "
                           f"{PARQUET_INFLATION_LIMIT} times the limit of {max_bytes}")
    try:
        values = pf.read(columns=[column]).column(column).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(f"dataset source {source!r}: column {column!r} cannot be read ({exc})") from None
    return [v for v in values if isinstance(v, str) and v.strip()]


def load_raw(source: str, sha256: str | None = None, cache_dir: str | None = None, *,
             policy: SourcePolicy | None = None) -> bytes:
    """The raw bytes of a ``file:`` or ``https://`` source, within ``policy`` (see :func:`load_documents`)."""
    policy = policy or SourcePolicy()
    if not isinstance(source, str):
        raise DatasetError(f"dataset source must be a string, not {type(source).__name__}")
    sha256 = _normalise_sha256(sha256)
    if source.startswith("file:"):
        raw = _read_file(source, policy)
        _check_sha256(raw, sha256, source)
        return raw
    if source[:8].lower() == "https://":
        if sha256 is None:
            raise DatasetError(f"dataset source {source!r}: an https dataset must be pinned by its sha256")
        host, port, _ = _https_parts(source, source)
        if _is_ip_literal(host):  # refused even when the pinned bytes are already in the cache
            _public_addresses(host, port, source, source, policy)
        dest = Path(cache_dir or default_cache_dir()) / f"{sha256}.txt"
        raw = _read_cached(dest, sha256, policy)
        if raw is None:
            raw = _download(source, dest, sha256, policy)
        return raw
    raise DatasetError(f"unsupported dataset source {source!r} (use builtin:python-docs, file:/abs/path or https://)")


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256):
        raise DatasetError("sha256 must be 64 hexadecimal characters")
    return sha256.lower()


def builtin_documents(source: str) -> list[str]:
    if source == "builtin:python-docs":
        from pydoc_data import topics

        docs = [topics.topics[key] for key in sorted(topics.topics)]
        return [d for d in docs if d.strip()]
    raise DatasetError(f"unknown built-in dataset {source!r} (known: {', '.join(BUILTIN_SOURCES)})")


def load_documents(
    source: str,
    sha256: str | None = None,
    cache_dir: str | None = None,
    *,
    policy: SourcePolicy | None = None,
    format: str = "text",
    field: str | None = None,
) -> list[str]:
    """Load a corpus as a list of documents, within ``policy`` (default: no file sources, 256 MiB).

    - ``builtin:python-docs``: the values of ``pydoc_data.topics.topics`` in sorted-key order (text only).
    - ``file:/abs/path``: a file under the policy's data root.
    - ``https://...``: downloaded once from a public address into ``cache_dir`` (named by its sha256,
      which is required and checked).

    Files and downloads are parsed as ``format`` says (:func:`parse_documents`: ``text`` split on blank
    lines, ``jsonl`` with a string ``field``, ``parquet`` with a string column named by ``field``).
    When ``sha256`` is given it is checked against the raw bytes (for the built-in corpus: the UTF-8
    bytes of the documents joined with blank lines).
    """
    return load_dataset(source, sha256, cache_dir, policy=policy, format=format, field=field)[0]


def load_dataset(source: str, sha256: str | None = None, cache_dir: str | None = None, *,
                 policy: SourcePolicy | None = None, format: str = "text",
                 field: str | None = None) -> tuple[list[str], str]:
    """:func:`load_documents`, and the sha256 of the raw bytes the documents came from (what the ledger
    records; for the built-in corpus, of its documents joined with blank lines)."""
    policy = policy or SourcePolicy()
    if not isinstance(source, str):
        raise DatasetError(f"dataset source must be a string, not {type(source).__name__}")
    sha256 = _normalise_sha256(sha256)
    if format not in DATASET_FORMATS:
        raise DatasetError(f"dataset source {source!r}: unknown format {format!r} (known: {', '.join(DATASET_FORMATS)})")
    if source.startswith("builtin:"):
        if format != "text":
            raise DatasetError(f"dataset source {source!r} is text; it cannot be read as {format}")
        docs = builtin_documents(source)
        joined = DOCUMENT_SEPARATOR.join(docs).encode("utf-8")
        _check_sha256(joined, sha256, source)
        return docs, hashlib.sha256(joined).hexdigest()
    raw = load_raw(source, sha256, cache_dir, policy=policy)
    docs = parse_documents(raw, format=format, field=field, source=source, max_bytes=policy.max_bytes)
    return docs, hashlib.sha256(raw).hexdigest()


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


def bits_per_byte(loss: float, *, tokens: int, nbytes: int) -> float | None:
    """Bits per UTF-8 byte of a mean cross-entropy ``loss`` (nats per token) over text of ``nbytes`` bytes
    that encodes to ``tokens`` tokens: what compares models whose tokenizers differ."""
    if not nbytes or not tokens or loss is None or not math.isfinite(loss):
        return None
    bpb = float(loss) * tokens / nbytes / math.log(2)
    return bpb if math.isfinite(bpb) else None


# --- pre-tokenized shards -------------------------------------------------------------------------
#
# A shard is a safetensors file with three 1-D tensors and one JSON metadata entry (one key, so the bytes
# and hence the content address are the same for the same tokens):
#
# - ``tokens``: the documents' ids with the tokenizer's separator between documents, in the narrowest dtype
#   every id fits: uint8 (bytes), uint16 (vocabulary ≤ 65 536) or int32;
# - ``doc_starts``, ``doc_lengths`` (int64): where each document's ids are in ``tokens``;
# - metadata ``agora``: ``format`` (``agora-token-shard/1``), ``vocab_size``, ``tokenizer`` (``byte`` or the
#   sha256 of ``tokenizer.json``), ``documents``, ``bytes`` (UTF-8 bytes of the documents, for bits per byte)
#   and whatever else the writer adds (``split``, ``shard_index``, ...).

SHARD_FORMAT = "agora-token-shard/1"
SHARD_META_KEY = "agora"
MAX_SHARD_BYTES = 4 * 1024**3
_SHARD_TENSORS = {"tokens": ("U8", "U16", "I32"), "doc_starts": ("I64",), "doc_lengths": ("I64",)}
_SHARD_HEADER_MAX = 64 * 1024


class ShardError(ValueError):
    """Shard bytes are not a valid token shard (or not the one expected)."""


@dataclass(frozen=True)
class TokenShard:
    tokens: Tensor  # 1-D int64
    doc_starts: Tensor  # 1-D int64
    doc_lengths: Tensor  # 1-D int64
    vocab_size: int
    tokenizer: str  # "byte" or the tokenizer's sha256
    nbytes: int
    meta: dict

    @property
    def documents(self) -> int:
        return int(self.doc_starts.numel())

    def document(self, index: int) -> Tensor:
        start = int(self.doc_starts[index])
        return self.tokens[start:start + int(self.doc_lengths[index])]


def token_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest dtype every id fits: uint8 for bytes, uint16 up to 65 536 ids, else int32."""
    return torch.uint8 if vocab_size <= 256 else torch.uint16 if vocab_size <= 65_536 else torch.int32


def write_token_shard(ids, *, doc_starts, doc_lengths, vocab_size: int, tokenizer: str, nbytes: int,
                      meta: dict | None = None) -> bytes:
    """Safetensors bytes of a token shard (see above); ``ids`` is any 1-D integer sequence or tensor."""
    tokens = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    starts = torch.as_tensor(doc_starts, dtype=torch.int64).reshape(-1)
    lengths = torch.as_tensor(doc_lengths, dtype=torch.int64).reshape(-1)
    _check_layout(tokens, starts, lengths, vocab_size)
    info = {**(meta or {}), "format": SHARD_FORMAT, "vocab_size": int(vocab_size), "tokenizer": str(tokenizer),
            "documents": int(starts.numel()), "bytes": int(nbytes), "tokens": int(tokens.numel())}
    text = json.dumps(info, sort_keys=True, separators=(",", ":"), allow_nan=False)
    tensors = {"tokens": tokens.to(token_dtype(vocab_size)), "doc_starts": starts, "doc_lengths": lengths}
    return st_save(tensors, metadata={SHARD_META_KEY: text})


def _check_layout(tokens: Tensor, starts: Tensor, lengths: Tensor, vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= 1 << 31:
        raise ShardError(f"vocab_size must be a positive integer, not {vocab_size!r}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = int(tokens.max()) if int(tokens.max()) >= vocab_size else int(tokens.min())
        raise ShardError(f"token id {bad} is outside the vocabulary of {vocab_size}")
    if starts.numel() != lengths.numel():
        raise ShardError(f"{starts.numel()} document starts but {lengths.numel()} lengths")
    if starts.numel():
        ends = starts + lengths
        if int(lengths.min()) < 0 or int(starts.min()) < 0 or int(ends.max()) > tokens.numel():
            raise ShardError("a document lies outside the shard's tokens")
        if starts.numel() > 1 and bool((starts[1:] < ends[:-1]).any()):
            raise ShardError("documents overlap or are out of order")


def _shard_header(data: bytes) -> dict:
    from diloco import safejson

    if len(data) < 8:
        raise ShardError("not a safetensors file: too short")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > _SHARD_HEADER_MAX or 8 + header_len > len(data):
        raise ShardError(f"not a token shard: header length {header_len}")
    try:
        header = safejson.loads(data[8:8 + header_len], max_depth=4, what="header")
    except ValueError as exc:
        raise ShardError(f"not a token shard: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ShardError("not a token shard: the header is not an object")
    return header


def read_token_shard(data: bytes, *, vocab_size: int | None = None, tokenizer: str | None = None,
                     max_bytes: int = MAX_SHARD_BYTES) -> TokenShard:
    """A token shard from its bytes, checked: tensor names, dtypes and shapes, ids within the vocabulary,
    documents within the tokens, metadata consistent. ``vocab_size`` and ``tokenizer`` (when given) must
    match the shard's. Raises :class:`ShardError` saying what is wrong."""
    data = bytes(data)
    if len(data) > max_bytes:
        raise ShardError(f"shard has {len(data)} bytes, over the limit of {max_bytes}")
    header = _shard_header(data)
    meta_raw = header.pop("__metadata__", None)
    if set(header) != set(_SHARD_TENSORS):
        raise ShardError(f"a token shard holds tensors {sorted(_SHARD_TENSORS)}, not {sorted(header)}")
    for name, allowed in _SHARD_TENSORS.items():
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") not in allowed:
            raise ShardError(f"tensor {name} must have dtype {' or '.join(allowed)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) != 1:
            raise ShardError(f"tensor {name} must be 1-D")
    if not isinstance(meta_raw, dict) or not isinstance(meta_raw.get(SHARD_META_KEY), str):
        raise ShardError("not a token shard: no agora metadata")
    try:
        meta = json.loads(meta_raw[SHARD_META_KEY])
    except (ValueError, RecursionError):
        raise ShardError("the shard's metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"not a token shard of format {SHARD_FORMAT}")
    ints = {}
    for key in ("vocab_size", "documents", "bytes", "tokens"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ShardError(f"the shard's metadata {key} must be a non-negative integer")
        ints[key] = value
    shard_tokenizer = meta.get("tokenizer")
    if not isinstance(shard_tokenizer, str):
        raise ShardError("the shard's metadata names no tokenizer")
    if vocab_size is not None and ints["vocab_size"] != vocab_size:
        raise ShardError(f"the shard is for a vocabulary of {ints['vocab_size']}, not {vocab_size}")
    if tokenizer is not None and shard_tokenizer != tokenizer:
        raise ShardError(f"the shard was made with tokenizer {shard_tokenizer}, not {tokenizer}")
    expected_dtype = {torch.uint8: "U8", torch.uint16: "U16", torch.int32: "I32"}[token_dtype(ints["vocab_size"])]
    if header["tokens"]["dtype"] != expected_dtype:
        raise ShardError(f"tensor tokens must have dtype {expected_dtype} for a vocabulary of {ints['vocab_size']}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for every malformed input
        raise ShardError(f"not a readable safetensors file: {exc}") from None
    tokens = tensors["tokens"].to(torch.int64)
    starts, lengths = tensors["doc_starts"], tensors["doc_lengths"]
    if tokens.numel() != ints["tokens"] or starts.numel() != ints["documents"]:
        raise ShardError("the shard's metadata does not match its tensors (token or document count)")
    _check_layout(tokens, starts, lengths, ints["vocab_size"])
    return TokenShard(tokens=tokens, doc_starts=starts, doc_lengths=lengths, vocab_size=ints["vocab_size"],
                      tokenizer=shard_tokenizer, nbytes=ints["bytes"], meta=meta)


def tokenize_documents(docs: list[str], tokenizer) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, doc_starts, doc_lengths) of ``docs`` joined by the tokenizer's separator. With the byte
    tokenizer the tokens are exactly :func:`encode_documents`'s. Built from tensors, not one Python list of
    ids, so a large corpus costs its tokens' bytes, not a Python object per id."""
    from diloco.tokenization import encode_texts

    sep = list(tokenizer.separator)
    if getattr(tokenizer, "kind", None) == "byte":
        lengths = torch.tensor([len(d.encode("utf-8")) for d in docs], dtype=torch.int64)
        tokens = encode_documents(docs)
    else:
        pieces = [torch.tensor(ids, dtype=torch.int64) for ids in encode_texts(tokenizer, docs)]
        lengths = torch.tensor([p.numel() for p in pieces], dtype=torch.int64)
        separator = torch.tensor(sep, dtype=torch.int64)
        joined: list[Tensor] = []
        for i, piece in enumerate(pieces):
            if i:
                joined.append(separator)
            joined.append(piece)
        tokens = torch.cat(joined) if joined else torch.zeros(0, dtype=torch.int64)
    gaps = torch.full_like(lengths, len(sep))
    if lengths.numel():
        gaps[0] = 0
    starts = torch.cumsum(lengths + gaps, 0) - lengths
    return tokens, starts, lengths


def encode_token_shard(docs: list[str], tokenizer, *, meta: dict | None = None) -> bytes:
    """The shard of ``docs`` under ``tokenizer`` (see :func:`write_token_shard`)."""
    tokens, starts, lengths = tokenize_documents(docs, tokenizer)
    return write_token_shard(tokens, doc_starts=starts, doc_lengths=lengths, vocab_size=tokenizer.vocab_size,
                             tokenizer=tokenizer.sha256 or "byte", nbytes=sum(len(d.encode("utf-8")) for d in docs),
                             meta=meta)


def shard_filtered_tokens(shard: TokenShard, tokenizer, guardrails: list[dict]) -> tuple[Tensor, int]:
    """The shard's tokens without the documents the data filters drop now (a guardrail enacted after the
    shard was written still applies): each document is decoded, filtered, and the kept ones are joined by
    the separator again. Returns (tokens, documents dropped); raises ``GuardrailError`` like the filter."""
    from diloco.guardrails import filter_documents

    if not guardrails or not shard.documents:
        return shard.tokens, 0
    texts = [tokenizer.decode(shard.document(i).tolist()) for i in range(shard.documents)]
    kept_texts, dropped = filter_documents(texts, guardrails)
    if not dropped:
        return shard.tokens, 0
    kept = set()
    remaining = iter(kept_texts)
    want = next(remaining, None)
    for i, text in enumerate(texts):  # filter_documents keeps order: walk both lists together
        if want is not None and text == want:
            kept.add(i)
            want = next(remaining, None)
    sep = torch.tensor(list(tokenizer.separator), dtype=torch.int64)
    pieces: list[Tensor] = []
    for i in sorted(kept):
        if pieces:
            pieces.append(sep)
        pieces.append(shard.document(i))
    return (torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)), dropped
