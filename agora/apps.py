from django.apps import AppConfig


class AgoraConfig(AppConfig):
    name = "agora"
    verbose_name = "Agora"

    def ready(self):
        from agora import schema  # noqa: F401  (registers the OpenAPI extensions)
