"""OpenAPI: the worker-token scheme of protocol v1, and every error an operation can answer.

``AutoSchema`` (``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]``) adds to each operation the 4xx codes that the
project's plumbing can produce for it, all with the one error body (component ``Error``):

- 400 always (a NUL character in any parameter is refused by ``agora.middleware``; bodies and parameters
  are validated);
- 401 where the view authenticates anyone (bad or missing credentials);
- 403 where a permission can refuse an authenticated caller (staff only; a suspended worker; CSRF on a
  session-authenticated write);
- 404 where the path has a parameter; 406 where DRF negotiates the answer's media type (``Accept``);
- 413 and 415 where the operation reads a body (``AGORA_MAX_BODY_BYTES``; a media type it cannot parse);
- 429 where a throttle of the view counts this method.

Codes that only a view knows (409 state conflicts, 410 an expired task, 413 an oversized upload, a 403
from a service's rule) are declared in the view's ``@extend_schema(responses=...)``; a 4xx declared there
without a body gets the error body here.
"""

from __future__ import annotations

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import permissions, serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.views import APIView


class WorkerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.auth.WorkerTokenAuthentication"
    name = "workerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The worker token `agora-worker enroll` received (shown once, stored hashed).",
        }


class ErrorSerializer(serializers.Serializer):
    """Every error answer of the API (4xx, and 503 where a service behind it is down)."""

    error = serializers.CharField(help_text="A stable code: `invalid`, `not_found`, `throttled`, `invalid_state`, ...")
    detail = serializers.CharField(help_text="What went wrong, for people; names the field at fault.")
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="For invalid input: each field or parameter at fault (dotted path) with its messages.",
    )

    class Meta:
        ref_name = "Error"


_DESCRIPTIONS = {
    "400": "Malformed request: a body, field or parameter is invalid (`fields` names each one).",
    "401": "Credentials are missing or invalid.",
    "403": "Not allowed for these credentials.",
    "404": "No such object.",
    "406": "The Accept header asks for a media type this operation cannot answer in.",
    "409": "The object is not in a state that allows this.",
    "410": "Gone.",
    "413": "The request body is too large.",
    "415": "Unsupported content type for the request body.",
    "429": "Rate limited: retry after the number of seconds in `Retry-After`.",
}
# Permissions that refuse only anonymous callers (a 401 where the view authenticates).
_ANONYMOUS_ONLY = (permissions.AllowAny, permissions.IsAuthenticated, permissions.IsAuthenticatedOrReadOnly)


class AutoSchema(openapi.AutoSchema):
    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        error = {"application/json": {"schema": self.resolve_serializer(ErrorSerializer, "response").ref}}
        responses = operation["responses"]
        for code in self._error_codes(operation):
            responses.setdefault(code, {"description": _DESCRIPTIONS[code]})
        for code, response in responses.items():
            if code[0] in "45" and "content" not in response:
                response["content"] = error
                response["description"] = response.get("description") or _DESCRIPTIONS.get(code, "")
        if "429" in responses:
            responses["429"].setdefault("headers", {})["Retry-After"] = {
                "schema": {"type": "integer"}, "description": "seconds until the next request may succeed"}
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def _error_codes(self, operation: dict) -> list[str]:
        from marketplace.auth import WorkerTokenAuthentication

        codes = ["400"]
        authenticators = self.view.get_authenticators()
        unsafe = self.method not in permissions.SAFE_METHODS
        if authenticators:
            codes.append("401")
        if (
            any(not isinstance(p, _ANONYMOUS_ONLY) for p in self.view.get_permissions())
            or any(isinstance(a, WorkerTokenAuthentication) for a in authenticators)
            or (unsafe and any(isinstance(a, SessionAuthentication) for a in authenticators))
        ):
            codes.append("403")
        if any(p.get("in") == "path" for p in operation.get("parameters", [])):
            codes.append("404")
        if type(self.view).perform_content_negotiation is APIView.perform_content_negotiation:
            codes.append("406")  # an Accept header that neither JSON nor the browsable API satisfies
        if "requestBody" in operation:
            codes += ["413", "415"]  # agora.parsers: AGORA_MAX_BODY_BYTES, and the media types it parses
        # A throttle may count only some methods (``core.ratelimit``: writes); DRF's own count them all.
        if any(self.method in getattr(t, "methods", (self.method,)) for t in self.view.get_throttles()):
            codes.append("429")
        return codes
