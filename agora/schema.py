"""OpenAPI extensions: describe the worker-token scheme of protocol v1."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class WorkerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.auth.WorkerTokenAuthentication"
    name = "workerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The worker token `agora-worker enroll` received (shown once, stored hashed).",
        }
