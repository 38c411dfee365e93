"""Stage failures with a machine-readable reason.

`permanent` failures (bad data, bad model, failed quality gate) are not retried by the operator; the stage entrypoint
exits with EXIT_PERMANENT_FAILURE for them. Reasons are CamelCase and listed in finetune_api.report.PERMANENT_REASONS.
"""

from __future__ import annotations


class StageError(Exception):
    """A stage failed for a known reason."""

    reason: str = "StageFailed"
    permanent: bool = False

    def __init__(self, message: str, *, reason: str | None = None, permanent: bool | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if permanent is not None:
            self.permanent = permanent


class ConfigError(StageError):
    """The rendered stage configuration cannot be run (e.g. an option the recipe does not support)."""

    reason = "InvalidConfig"
    permanent = True


class DataValidationError(StageError):
    """The dataset is missing, unreadable or lacks the columns the stage needs."""

    reason = "InvalidDataset"
    permanent = True


class ModelLoadError(StageError):
    """The model or tokenizer cannot be loaded from its URI."""

    reason = "InvalidModel"
    permanent = True


class QualityGateError(StageError):
    """A trained model failed a configured quality gate (e.g. reward accuracy below the minimum)."""

    reason = "QualityGateFailed"
    permanent = True


class KLLimitError(StageError):
    """RL training drifted further from the reference model than the configured KL limit."""

    reason = "KLLimitExceeded"
    permanent = True
