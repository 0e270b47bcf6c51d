"""Domain errors of training. Each carries ``code`` and ``http_status`` (see ``agora.api``)."""


class TrainingError(Exception):
    code = "training_error"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status


class NotYourTask(TrainingError):
    code = "not_your_task"
    http_status = 403


class TaskExpired(TrainingError):
    code = "task_expired"
    http_status = 410


class TaskCompleted(TrainingError):
    code = "task_completed"
    http_status = 409


class TaskNotOpen(TrainingError):
    code = "task_not_open"
    http_status = 409


class UploadTooLarge(TrainingError):
    code = "too_large"
    http_status = 413


class InvalidUpdate(TrainingError):
    """An uploaded pseudo-gradient that does not fit the model; ``code`` says what is wrong."""

    code = "invalid_update"
    http_status = 400


class RunError(TrainingError):
    code = "run_error"
    http_status = 409


class RunForbidden(TrainingError):
    """The caller may not do this to a run (e.g. a member who is not staff canceling one)."""

    code = "forbidden"
    http_status = 403


class ModelImportError(TrainingError):
    """A model directory that cannot be imported; ``field`` is the input it concerns (directory or slug)."""

    code = "invalid_model"
    http_status = 400

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
