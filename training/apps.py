from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"

    def ready(self):
        from governance.signals import training_proposal_approved
        from training.receivers import on_training_proposal_approved

        training_proposal_approved.connect(on_training_proposal_approved, dispatch_uid="training-start-run")
