"""Stage failures with a machine-readable reason.

`permanent` failures (bad data, bad model, failed quality gate) are not retried by the operator; the stage entrypoint
exits with EXIT_PERMANENT_FAILURE for them. Reasons come from finetune_api.reasons.Reason; the permanent ones are in its PERMANENT set.
"""

from __future__ import annotations

from finetune_api.reasons import PERMANENT, Reason


class StageError(Exception):
    """A stage failed for a known reason; it is permanent when its reason is in PERMANENT (unless told otherwise)."""

    reason: str = Reason.STAGE_FAILED

    def __init__(self, message: str, *, reason: str | None = None, permanent: bool | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self._permanent = permanent

    @property
    def permanent(self) -> bool:
        return self.reason in PERMANENT if self._permanent is None else self._permanent


class ConfigError(StageError):
    """The rendered stage configuration cannot be run (e.g. an option the recipe does not support)."""

    reason = Reason.INVALID_CONFIG


class DataValidationError(StageError):
    """The dataset is missing, unreadable or lacks the columns the stage needs."""

    reason = Reason.INVALID_DATASET


class ModelLoadError(StageError):
    """The model or tokenizer cannot be loaded from its URI."""

    reason = Reason.INVALID_MODEL


class StorageUnavailableError(StageError):
    """Storage did not answer (connection refused, timeout, 5xx, throttling): a later attempt may succeed."""

    reason = Reason.STORAGE_UNAVAILABLE


class QualityGateError(StageError):
    """A trained model failed a configured quality gate (e.g. reward accuracy below the minimum)."""

    reason = Reason.QUALITY_GATE_FAILED


class KLLimitError(StageError):
    """RL training drifted further from the reference model than the configured KL limit."""

    reason = Reason.KL_LIMIT_EXCEEDED


class TrainingDivergedError(StageError):
    """A loss or weight became NaN/inf: the same settings would diverge again, so no retry."""

    reason = Reason.TRAINING_DIVERGED


class ForgettingError(StageError):
    """A stage made an evaluation suite worse than the suite's `maxRegression` allows."""

    reason = Reason.FORGETTING_DETECTED
