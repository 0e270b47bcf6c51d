"""The client's address: decided here and nowhere else.

DRF throttles, django-axes, django-allauth and every rate limit call :func:`client_ip`. ``X-Forwarded-For``
is only believed as far as the operator says it can be:

- ``AGORA_TRUSTED_PROXIES`` (a list of addresses or CIDR networks): the header is read from the right,
  one hop at a time, while the peer that sent it is a trusted proxy. The first address that is not a
  trusted proxy is the client. A request that does not come from a trusted proxy is judged by its own
  ``REMOTE_ADDR`` whatever its headers say.
- otherwise ``AGORA_TRUSTED_PROXY_COUNT`` (an integer, the number of reverse proxies in front of the
  app): the client is the entry that many places from the right. The app must then be reachable only
  through those proxies. A header with fewer entries than that is ignored (``REMOTE_ADDR`` is used), so
  a misconfiguration lumps clients together rather than letting them choose their own address.
- neither (the default): no proxy; ``REMOTE_ADDR`` is the client and the header is ignored.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from django.conf import settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(value: str | None) -> Address | None:
    """An address as proxies write it (``1.2.3.4``, ``1.2.3.4:5678``, ``[2001:db8::1]:443``), or None."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("["):  # [v6] or [v6]:port
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=8)
def _networks(spec: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in spec if item.strip())


def trusted_networks() -> tuple[Network, ...]:
    return _networks(tuple(getattr(settings, "AGORA_TRUSTED_PROXIES", ()) or ()))


def _is_trusted(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)


def client_address(request) -> Address | None:
    meta = request.META
    peer = parse_address(meta.get("REMOTE_ADDR"))
    forwarded = [item.strip() for item in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if item.strip()]
    networks = trusted_networks()
    if networks:
        for item in reversed(forwarded):
            if peer is None or not _is_trusted(peer, networks):
                break
            hop = parse_address(item)
            if hop is None:  # a trusted proxy wrote something that is not an address: stop at the proxy
                break
            peer = hop
        return peer
    count = int(getattr(settings, "AGORA_TRUSTED_PROXY_COUNT", 0) or 0)
    if count > 0 and len(forwarded) >= count:
        hop = parse_address(forwarded[-count])
        if hop is not None:
            return hop
    return peer


def client_ip(request) -> str | None:
    """The client's address as text (``None`` when the server cannot tell, e.g. a Unix socket peer)."""
    address = client_address(request)
    return None if address is None else str(address)


def client_rate_key(request) -> str:
    """What rate limits count per address. An IPv6 client usually holds a whole /64 (or more), so it is
    counted per network of ``AGORA_RATE_IPV6_PREFIX`` bits, not per address it can rotate through."""
    address = client_address(request)
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        prefix = int(getattr(settings, "AGORA_RATE_IPV6_PREFIX", 64))
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
    return str(address)
