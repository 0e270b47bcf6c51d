"""Worker-token authentication for the worker protocol (``Authorization: Bearer <worker token>``).

On success ``request.user`` is the worker's owner and ``request.auth`` is the ``Worker``. Everything a
worker does is derived from its token, never from an id in the request body.

The hot path (heartbeats) must not hit the database: the token's facts are cached for a few seconds
(``presence.token_cache_*``) and the ``Worker`` and owner are then built from them as instances with
deferred fields: reading any other field loads it from the database on first access, and ``save()``
writes only loaded fields, so these instances are safe to hand to services.

The cache is an accelerator, never a dependency: when it is down, every lookup misses and the token is
checked against the database (one indexed query), so worker calls keep working through a Redis outage.
"""

from __future__ import annotations

from functools import partial

from django.contrib.auth import get_user_model
from django.utils.functional import SimpleLazyObject
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission

from marketplace import presence
from marketplace.errors import WorkerSuspended, WorkerTokenInvalid
from marketplace.models import Worker

_WORKER_FIELDS = ("id", "owner_id", "name", "status")
_USER_FIELDS = ("id", "username", "is_active", "is_staff")


def _deferred_instance(model, facts: dict, fields: tuple[str, ...], db: str = "default"):
    # from_db wants the loaded attnames in the model's field order.
    names = _ordered.get((model, fields))
    if names is None:
        names = _ordered[(model, fields)] = [f.attname for f in model._meta.concrete_fields if f.attname in fields]
    return model.from_db(db, names, [facts[name] for name in names])


_ordered: dict = {}


def _facts_from_db(digest: str) -> dict | None:
    worker = (
        Worker.objects.select_related("owner")
        .only("id", "owner_id", "name", "status", "owner__id", "owner__username", "owner__is_active",
              "owner__is_staff")
        .filter(token_hash=digest)
        .first()
    )
    if worker is None:
        return None
    owner = worker.owner
    return {
        "worker": {"id": worker.id, "owner_id": worker.owner_id, "name": worker.name, "status": worker.status},
        "owner": {"id": owner.id, "username": owner.username, "is_active": owner.is_active,
                  "is_staff": owner.is_staff},
    }


def worker_for_token(token: str) -> tuple[object, Worker]:
    """``(owner, worker)`` for a worker token, or raise ``WorkerTokenInvalid`` / ``WorkerSuspended``."""
    if not token or len(token) > 200:
        raise WorkerTokenInvalid()
    digest = presence.token_hash(token)
    facts = presence.token_cache_get(digest)  # None as well when the cache is down
    if facts is None:
        facts = _facts_from_db(digest)
        if facts is None:
            raise WorkerTokenInvalid()
        presence.token_cache_set(digest, facts)  # dropped (logged) when the cache is down
    status = facts["worker"]["status"]
    if status == Worker.Status.REVOKED or not facts["owner"]["is_active"]:
        raise WorkerTokenInvalid()
    if status == Worker.Status.SUSPENDED:
        raise WorkerSuspended()
    worker = _deferred_instance(Worker, facts["worker"], _WORKER_FIELDS)
    # Built only if something looks at request.user (a heartbeat does not).
    owner = SimpleLazyObject(partial(_deferred_instance, get_user_model(), facts["owner"], _USER_FIELDS))
    return owner, worker


class WorkerTokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer <worker token>``. Unknown or revoked: 401 ``invalid_token``; suspended: 403
    ``worker_suspended`` (both in the protocol's error shape, via the project exception handler)."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        keyword, _, token = header.partition(" ")
        if keyword != self.keyword:
            return None
        return worker_for_token(token.strip())

    def authenticate_header(self, request):
        return self.keyword


class IsWorker(BasePermission):
    """The request was authenticated with a worker token (``request.auth`` is a ``Worker``)."""

    def has_permission(self, request, view):
        return isinstance(request.auth, Worker)
