"""The worker protocol (enroll, heartbeat, me) and the public pool API. Thin: serializer -> service ->
serializer."""

from __future__ import annotations

from django.conf import settings
from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.generics import ListAPIView
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import selectors, services, tasks_liveness
from marketplace.auth import IsWorker, WorkerTokenAuthentication
from marketplace.serializers import (
    EnrollIn,
    EnrollOut,
    HeartbeatIn,
    HeartbeatOut,
    SuspendIn,
    WorkerMeOut,
    WorkerOut,
    heartbeat_parse,
)
from marketplace.throttles import EnrollAccountThrottle, EnrollRateThrottle, WorkerRateThrottle

# A 4xx declared with a description only gets the project's error body in the schema (agora.schema).
_CONFLICT = OpenApiResponse(description="The worker's state does not allow this (e.g. already revoked).")


class EnrollApi(APIView):
    """Exchange a single-use enrollment token and the machine's hardware for a worker token."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = [EnrollRateThrottle, EnrollAccountThrottle]  # per address, per the token's owner
    throttle_scope = "enroll"

    @extend_schema(request=EnrollIn, responses={
        201: EnrollOut,
        401: OpenApiResponse(description="The enrollment token is unknown."),
        403: OpenApiResponse(description="The enrollment token has expired or was already used.")})
    def post(self, request):
        data = EnrollIn(data=request.data)
        data.is_valid(raise_exception=True)
        created = services.worker_enroll(**data.validated_data)
        return Response(EnrollOut({"worker_id": created.record.pk, "worker_token": created.token}).data,
                        status=status.HTTP_201_CREATED)


class WorkerApiMixin:
    """Agents speak JSON only: one parser, one renderer, and no content negotiation to run per request."""

    authentication_classes = [WorkerTokenAuthentication]
    permission_classes = [IsWorker]
    renderer_classes = [JSONRenderer]

    def get_parsers(self):
        # The project's JSON parser (bounded nesting, finite numbers), whichever class the settings name.
        return [parser for parser in super().get_parsers() if parser.media_type == "application/json"]

    def perform_content_negotiation(self, request, force=False):
        return self.renderer_classes[0](), "application/json"


class HeartbeatApi(WorkerApiMixin, APIView):
    """The agent says it is alive (every ``poll_after_s`` seconds). Writes the cache, not the database."""

    throttle_classes = [WorkerRateThrottle]
    throttle_scope = "heartbeat"

    @extend_schema(request=HeartbeatIn, responses={200: HeartbeatOut})
    def post(self, request):
        beat = heartbeat_parse(request.data)
        value = services.worker_heartbeat(worker=request.auth, **beat)
        state = selectors.live_state_from(request.auth, value)
        reply = {"poll_after_s": settings.AGORA_HEARTBEAT_INTERVAL_S, "worker_state": state,
                 "server_time": timezone.now().isoformat(timespec="milliseconds"), "stop_task": False}
        if beat["task_id"] is not None:
            reason = tasks_liveness.stop_reason(task_id=beat["task_id"], worker_id=request.auth.pk)
            if reason:
                reply.update(stop_task=True, stop_reason=reason)
        return Response(reply)


class WorkerMeApi(WorkerApiMixin, APIView):
    """The calling worker's own record and live state (``agora-worker status``)."""

    @extend_schema(responses={200: WorkerMeOut, 404: OpenApiResponse(description="The worker was deleted.")})
    def get(self, request):
        worker = selectors.worker_get(worker_id=request.auth.pk)
        if worker is None:  # deleted after the token was cached
            raise Http404
        selectors.with_live_state([worker])
        return Response(WorkerMeOut(worker).data)


class WorkerListApi(ListAPIView):
    """The public pool: every worker that is not revoked, with its live state. No secrets, no e-mail."""

    permission_classes = [AllowAny]
    serializer_class = WorkerOut

    def get_queryset(self):
        return selectors.worker_list_public()

    def paginate_queryset(self, queryset):
        page = super().paginate_queryset(queryset)
        return selectors.with_live_state(page if page is not None else queryset)


class WorkerDetailApi(APIView):
    permission_classes = [AllowAny]

    @extend_schema(responses={200: WorkerOut})
    def get(self, request, worker_id: int):
        worker = selectors.worker_get(worker_id=worker_id)
        if worker is None:
            raise Http404
        selectors.with_live_state([worker])
        return Response(WorkerOut(worker).data)


class _WorkerActionApi(APIView):
    permission_classes = [IsAuthenticated]

    def _worker(self, worker_id: int):
        worker = selectors.worker_get(worker_id=worker_id)
        if worker is None:
            raise Http404
        return worker

    def _render(self, worker):
        worker = selectors.worker_get(worker_id=worker.pk)
        selectors.with_live_state([worker])
        return Response(WorkerOut(worker).data)


class WorkerSuspendApi(_WorkerActionApi):
    """Staff: suspend a worker (it gets 403 ``worker_suspended`` on every call until reinstated)."""

    @extend_schema(request=SuspendIn, responses={200: WorkerOut, 409: _CONFLICT})
    def post(self, request, worker_id: int):
        worker = self._worker(worker_id)
        data = SuspendIn(data=request.data)
        data.is_valid(raise_exception=True)
        return self._render(services.worker_suspend(worker=worker, by=request.user, **data.validated_data))


class WorkerReinstateApi(_WorkerActionApi):
    """Staff: lift a suspension."""

    @extend_schema(request=None, responses={200: WorkerOut, 409: _CONFLICT})
    def post(self, request, worker_id: int):
        return self._render(services.worker_reinstate(worker=self._worker(worker_id), by=request.user))


class WorkerRevokeApi(_WorkerActionApi):
    """Owner: revoke the worker's token for good (401 ``invalid_token`` afterwards)."""

    @extend_schema(request=None, responses={200: WorkerOut, 409: _CONFLICT})
    def post(self, request, worker_id: int):
        return self._render(services.worker_revoke(worker=self._worker(worker_id), by=request.user))
