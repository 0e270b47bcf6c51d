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


def load_documents(
    source: str,
    sha256: str | None = None,
    cache_dir: str | None = None,
    *,
    policy: SourcePolicy | None = None,
) -> list[str]:
    """Load a corpus as a list of documents, within ``policy`` (default: no file sources, 256 MiB).

    - ``builtin:python-docs``: the values of ``pydoc_data.topics.topics`` in sorted-key order.
    - ``file:/abs/path``: a UTF-8 text file under the policy's data root, split into documents on blank
      lines (``"\\n\\n"``).
    - ``https://...``: downloaded once from a public address into ``cache_dir`` (named by its sha256,
      which is required and checked), then split like a file.

    When ``sha256`` is given it is checked against the raw bytes (for the built-in corpus: the UTF-8
    bytes of the documents joined with blank lines).
    """
    policy = policy or SourcePolicy()
    if not isinstance(source, str):
        raise DatasetError(f"dataset source must be a string, not {type(source).__name__}")
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
        raw = _read_file(source, policy)
        _check_sha256(raw, sha256, source)
        return _split_text(raw.decode("utf-8", errors="replace"))
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
