"""Worker protocol v1 (claim, checkpoint, result, fail) and the member API for runs."""

from __future__ import annotations

import json

from django.conf import settings
from django.http import FileResponse, Http404, HttpResponseNotModified
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import generics, serializers
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import AllowAny, IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from core.ratelimit import per_address
from diloco import safejson
from governance.selectors import guardrails_active
from marketplace.auth import IsWorker, WorkerTokenAuthentication
from marketplace.throttles import WorkerRateThrottle
from training import blobs, selectors, services
from training.errors import TrainingError, UploadTooLarge
from training.models import TrainingRun
from training.serializers import (
    MetricsSerializer,
    ResultAcceptedSerializer,
    RunCancelInput,
    RunDetailSerializer,
    RunListSerializer,
    TaskFailSerializer,
    task_payload,
)

# The multipart envelope and the metrics field on top of the update itself.
_ENVELOPE_ALLOWANCE = 64 * 1024


# A 4xx declared with a description only gets the project's error body in the schema (agora.schema).
_TASK_CONFLICT = OpenApiResponse(description="The task already has a result, or is no longer open.")
_TASK_GONE = OpenApiResponse(description="The task expired (deadline passed or round closed); it went to another "
                                         "worker.")


class _WorkerApi(APIView):
    authentication_classes = [WorkerTokenAuthentication]
    permission_classes = [IsWorker]


class TaskClaimApi(_WorkerApi):
    # Per worker (scope claim_worker) and per client address (claim_address): a stolen or looping agent
    # cannot hammer the coordinator's busiest query.
    throttle_classes = [WorkerRateThrottle, per_address("claim_address")]
    throttle_scope = "claim_worker"

    @extend_schema(request=None, responses={200: OpenApiTypes.OBJECT, 204: OpenApiResponse(description="no work")},
                   summary="Claim the next task this worker can run")
    def post(self, request):
        task = services.task_claim(worker=request.auth)
        if task is None:
            return Response(status=204)
        body = task_payload(task, request=request, guardrails=guardrails_active(kind="data_filter"),
                            max_upload_bytes=services.max_upload_bytes(task.round.run))
        return Response(body)


def _parse_metrics(raw) -> dict:
    if raw is None or raw == "":
        raise serializers.ValidationError({"metrics": ["This field is required (a JSON object)."]})
    if hasattr(raw, "read"):
        raw = raw.read(_ENVELOPE_ALLOWANCE)
    try:
        value = safejson.loads(raw, max_depth=settings.AGORA_JSON_MAX_DEPTH, what="metrics")
    except safejson.JsonRefused as exc:
        raise serializers.ValidationError({exc.field: [exc.reason]}) from None
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        _name_nonfinite_metric(raw)
        raise serializers.ValidationError({"metrics": [f"not valid JSON: {exc}"]}) from None
    if not isinstance(value, dict):
        raise serializers.ValidationError({"metrics": ["must be a JSON object"]})
    serializer = MetricsSerializer(data=value)
    if not serializer.is_valid():
        raise serializers.ValidationError({"metrics": serializer.errors})
    return dict(serializer.validated_data)


def _name_nonfinite_metric(raw) -> None:
    """``safejson`` refuses ``NaN``, ``Infinity`` and ``1e400`` while parsing, before it knows where they
    are. Metrics are one flat object: read it leniently and let the field checks name the value
    (``metrics.loss_end: Must be a finite number``). Returns when that is not what was wrong."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return
    if not isinstance(value, dict) or any(isinstance(item, dict | list) for item in value.values()):
        return
    serializer = MetricsSerializer(data=value)
    if not serializer.is_valid():
        raise serializers.ValidationError({"metrics": serializer.errors})


class TaskResultApi(_WorkerApi):
    parser_classes = [MultiPartParser]

    @extend_schema(
        request={"multipart/form-data": {"type": "object", "required": ["update", "metrics"], "properties": {
            "update": {"type": "string", "format": "binary",
                       "description": "the pseudo-gradient as safetensors, encoded as the task's `compression` says"},
            "metrics": {"type": "string", "description": "a JSON object: `loss_start`, `loss_end`, `steps`, "
                                                           "`tokens`, `seconds`"}}}},
        responses={202: ResultAcceptedSerializer, 409: _TASK_CONFLICT, 410: _TASK_GONE,
                   413: OpenApiResponse(description="The update is larger than this task accepts.")},
        summary="Upload a task's pseudo-gradient (safetensors) and its metrics",
    )
    def post(self, request, task_id: int):
        # Ownership, state and size are checked before the body is read.
        task = services.task_for_worker(task_id=task_id, worker=request.auth)
        limit = services.max_upload_bytes(task.round.run)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit + _ENVELOPE_ALLOWANCE:
            raise UploadTooLarge(f"request is {length} bytes; this task accepts updates of at most {limit}")
        upload = request.FILES.get("update")
        if upload is None:
            raise serializers.ValidationError({"update": ["This field is required (a safetensors file)."]})
        if upload.size > limit:
            raise UploadTooLarge(f"update is {upload.size} bytes; this task accepts at most {limit}")
        metrics = _parse_metrics(request.data.get("metrics") or request.FILES.get("metrics"))
        data = upload.read()
        task = services.task_submit_result(task_id=task.pk, worker=request.auth, data=data, metrics=metrics)
        return Response({"accepted_for_aggregation": True, "task_id": task.pk, "update_sha256": task.update_sha256},
                        status=202)


class TaskFailApi(_WorkerApi):
    @extend_schema(request=TaskFailSerializer, responses={200: OpenApiTypes.OBJECT, 409: _TASK_CONFLICT,
                                                          410: _TASK_GONE},
                   summary="Give a task up so that it goes to another worker")
    def post(self, request, task_id: int):
        serializer = TaskFailSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        task = services.task_fail(task_id=task_id, worker=request.auth, reason=serializer.validated_data["reason"])
        return Response({"task_id": task.pk, "status": task.status})


@extend_schema(
    summary="Checkpoint weights (safetensors) by sha256: immutable, cacheable forever, public",
    responses={(200, "application/octet-stream"): OpenApiTypes.BINARY,
               304: OpenApiResponse(description="not modified (If-None-Match matched the ETag)"),
               404: OpenApiResponse(description="no such checkpoint"),
               409: OpenApiResponse(description="`checkpoint_corrupt`: the stored file does not match its sha256, "
                                                "or `checkpoint_missing`: it is gone from storage; never served"),
               503: OpenApiResponse(description="`storage_unavailable`: checkpoint storage cannot be read now")},
)
@api_view(["GET"])
@authentication_classes([])
@permission_classes([AllowAny])
def checkpoint_download(request, sha256: str):
    """Checkpoint bytes by content hash: immutable, cacheable forever, public like the weights themselves.
    The file is checked against its sha256 before it is streamed, and its true length is sent."""
    checkpoint = selectors.checkpoint_get(sha256=sha256.lower())
    if checkpoint is None:
        raise Http404("no such checkpoint")
    etag = f'"{checkpoint.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        response = HttpResponseNotModified()
    else:
        fh, length = _checkpoint_open(checkpoint)
        response = FileResponse(fh, content_type="application/octet-stream", as_attachment=True,
                                filename=f"{checkpoint.model_id}-{checkpoint.sha256[:12]}.safetensors")
        response["Content-Length"] = str(length)
    for key, value in headers.items():
        response[key] = value
    return response


@extend_schema(
    summary="The published step that rebuilds a checkpoint from the previous round's (public, immutable)",
    description="Runs with a sparse codec publish each accepted round's outer step d, θ_new = θ_old − d in float32 "
                "(`diloco.sparse`). The task payload names it (`delta_from_sha256`, `delta_sha256`): an agent "
                "holding `delta_from_sha256` downloads this instead of the checkpoint, applies it, writes the "
                "checkpoint with the metadata the step carries and checks its sha256, falling back to the "
                "checkpoint on a mismatch.",
    responses={(200, "application/octet-stream"): OpenApiTypes.BINARY,
               404: OpenApiResponse(description="no such checkpoint, or it has no published step"),
               409: OpenApiResponse(description="`delta_corrupt` or `delta_missing`: never served"),
               503: OpenApiResponse(description="`storage_unavailable`: storage cannot be read now")},
)
@api_view(["GET"])
@authentication_classes([])
@permission_classes([AllowAny])
def checkpoint_delta_download(request, sha256: str):
    from training.services.deltas import delta_of, delta_storage_name

    delta = delta_of(selectors.checkpoint_get(sha256=sha256.lower()))
    if delta is None:
        raise Http404("no published step for this checkpoint")
    try:
        fh, length = blobs.blob_open_verified(delta_storage_name(delta["sha256"]), delta["sha256"])
    except blobs.BlobCorrupt:
        raise TrainingError("the published step is damaged in storage", code="delta_corrupt", http_status=409) from None
    except FileNotFoundError:
        raise TrainingError("the published step is missing from storage", code="delta_missing",
                            http_status=409) from None
    except Exception as exc:
        raise TrainingError(f"storage cannot be read now ({exc.__class__.__name__}); try again later",
                            code="storage_unavailable", http_status=503) from exc
    response = FileResponse(fh, content_type="application/octet-stream")
    response["Content-Length"] = str(length)
    response["ETag"] = f'"{delta["sha256"]}"'
    response["Cache-Control"] = "public, max-age=31536000, immutable"
    return response


def _checkpoint_open(checkpoint):
    """The verified checkpoint file and its length, or the protocol error that says why not (logged)."""
    try:
        return blobs.blob_open_verified(checkpoint.storage_name, checkpoint.sha256)
    except blobs.BlobCorrupt:
        raise TrainingError(f"checkpoint {checkpoint.sha256} is damaged in storage and is not served",
                            code="checkpoint_corrupt", http_status=409) from None
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {checkpoint.sha256} is missing from storage",
                            code="checkpoint_missing", http_status=409) from None
    except Exception as exc:  # S3 unreachable, disk errors: the agent retries a 503
        raise TrainingError(f"checkpoint storage cannot be read now ({exc.__class__.__name__}); try again later",
                            code="storage_unavailable", http_status=503) from exc


@extend_schema_view(get=extend_schema(parameters=[
    OpenApiParameter("status", str, enum=TrainingRun.Status.values, description="only runs in this state")]))
class RunListApi(generics.ListAPIView):
    serializer_class = RunListSerializer
    permission_classes = [AllowAny]

    def get_queryset(self):
        status = self.request.query_params.get("status", "")
        if status and status not in TrainingRun.Status.values:
            raise serializers.ValidationError({"status": [f"Must be one of {', '.join(TrainingRun.Status.values)}."]})
        return selectors.runs_list(status=status)


def _run_detail(request, pk: int) -> Response:
    run = selectors.run_get(pk=pk)
    run.losses = selectors.run_loss_points(run)
    from training.services.datasets import run_bits_per_byte

    for point in run.losses:
        point.heldout_bpb = run_bits_per_byte(run, point.heldout)
    run.contributors = selectors.run_contributors(run)
    return Response(RunDetailSerializer(run, context={"request": request}).data)


class RunDetailApi(APIView):
    permission_classes = [AllowAny]

    @extend_schema(responses=RunDetailSerializer, summary="A run with its rounds, losses and contributors")
    def get(self, request, pk: int):
        return _run_detail(request, pk)


class RunCancelApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(request=RunCancelInput, responses={200: RunDetailSerializer, 409: OpenApiResponse(
                       description="Only a pending or running run can be canceled.")},
                   summary="Cancel a pending or running run (staff), with a public reason")
    def post(self, request, pk: int):
        data = RunCancelInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.run_cancel(run_id=pk, by=request.user, reason=data.validated_data["reason"])
        return _run_detail(request, pk)


def _dataset_blob_response(request, *, sha256: str, kind: str, content_type: str, filename: str):
    """A tokenizer or token shard by sha256: verified before it is streamed, immutable, ETag-cacheable."""
    from training.services.datasets import dataset_blob_get

    blob = dataset_blob_get(sha256=sha256.lower(), kind=kind)
    if blob is None:
        raise Http404(f"no such {kind}")
    etag = f'"{blob.sha256}"'
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        response = HttpResponseNotModified()
    else:
        try:
            fh, length = blobs.blob_open_verified(blob.storage_name, blob.sha256)
        except blobs.BlobCorrupt:
            raise TrainingError(f"{kind} {blob.sha256} is damaged in storage and is not served",
                                code=f"{kind}_corrupt", http_status=409) from None
        except FileNotFoundError:
            raise TrainingError(f"{kind} {blob.sha256} is missing from storage", code=f"{kind}_missing",
                                http_status=409) from None
        except OSError as exc:
            raise TrainingError(f"storage cannot be read now ({exc.__class__.__name__}); try again later",
                                code="storage_unavailable", http_status=503) from exc
        response = FileResponse(fh, content_type=content_type, as_attachment=True, filename=filename)
        response["Content-Length"] = str(length)
    response["ETag"] = etag
    response["Cache-Control"] = "private, max-age=31536000, immutable"
    return response


def _dataset_blob_schema(what: str):
    return extend_schema(
        summary=f"{what} by sha256 (worker token): immutable, cacheable forever",
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY,
                   304: OpenApiResponse(description="not modified (If-None-Match matched the ETag)"),
                   404: OpenApiResponse(description=f"no such {what.lower()}"),
                   409: OpenApiResponse(description="the stored file does not match its sha256, or is gone; never "
                                                    "served"),
                   503: OpenApiResponse(description="`storage_unavailable`: storage cannot be read now")})


class TokenizerDownloadApi(_WorkerApi):
    @_dataset_blob_schema("A run's tokenizer.json")
    def get(self, request, sha256: str):
        return _dataset_blob_response(request, sha256=sha256, kind="tokenizer", content_type="application/json",
                                      filename=f"tokenizer-{sha256[:12]}.json")


class ShardDownloadApi(_WorkerApi):
    @_dataset_blob_schema("A pre-tokenized data shard (safetensors)")
    def get(self, request, sha256: str):
        return _dataset_blob_response(request, sha256=sha256, kind="shard", content_type="application/octet-stream",
                                      filename=f"shard-{sha256[:12]}.safetensors")
