from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"

    def ready(self):
        from governance.signals import training_proposal_approved
        from training.receivers import on_training_proposal_approved

        training_proposal_approved.connect(on_training_proposal_approved, dispatch_uid="training-start-run")

        from training.receivers import on_round_result_stored
        from training.signals import round_result_stored

        round_result_stored.connect(on_round_result_stored, dispatch_uid="training-round-check")

        from governance.specs import register_model_rules
        from training.model_rules import count_params, validate_config

        register_model_rules(validate=validate_config, param_count=count_params)

        from marketplace import tasks_liveness

        tasks_liveness.register(_task_stop_reason)


def _task_stop_reason(task_id: int, worker_id: int) -> str | None:
    """The heartbeat's database answer (``marketplace.tasks_liveness``); training's services load lazily."""
    from training.services import task_stop_reason

    return task_stop_reason(task_id, worker_id)
