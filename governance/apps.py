from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    name = "governance"

    def ready(self):
        from core.notifications import notification_requested
        from governance.notifications import notify

        notification_requested.connect(notify, dispatch_uid="governance.notify")
