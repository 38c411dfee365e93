"""The progress channel from a running stage to whoever owns the status.

The trainer writes one StageReport (JSON) per stage: into the per-stage ConfigMap on a cluster (key `report.json`),
or into a file locally. The operator reads it and mirrors it into FineTuneJob.status; it is the only status writer.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PlainSerializer

from finetune_api.spec import ApiModel

REPORT_KEY = "report.json"
# The report shares the stage's ConfigMap (1 MiB in all) with the config, which may take all but 64 KiB of it
# (render.STAGE_CONFIG_MAX_BYTES): a failure's message, an exception's text, is cut to fit.
MESSAGE_MAX_CHARS = 8 * 1024  # at most 32 KiB of UTF-8


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _finite_only(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


# JSON has no NaN or infinity: the API server refuses a status patch carrying one. Non-finite numbers are dropped both
# when a report is read (a report written by an older trainer) and when it is written (fields assigned in place skip
# validation).
FiniteOrNone = Annotated[float | None, AfterValidator(_finite_or_none), PlainSerializer(_finite_or_none)]
FiniteMetrics = Annotated[dict[str, float], AfterValidator(_finite_only), PlainSerializer(_finite_only)]


def _bounded(message: str) -> str:
    return message if len(message) <= MESSAGE_MAX_CHARS else message[: MESSAGE_MAX_CHARS - 1] + "…"


BoundedMessage = Annotated[str, AfterValidator(_bounded), PlainSerializer(_bounded)]


class StageReport(ApiModel):
    # A newer trainer's report may carry fields this operator does not know: they are ignored, so a trainer image
    # newer than the operator still reports its phase, progress and failure.
    model_config = {**ApiModel.model_config, "extra": "ignore"}

    phase: Literal["Running", "Succeeded", "Failed"] = Field(description="Phase of the attempt as the trainer sees it.")
    attempt: int = Field(default=1, description="Attempt that wrote this report.")
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps planned.")
    epoch: FiniteOrNone = Field(default=None, description="Epochs done.")
    eta_seconds: FiniteOrNone = Field(default=None, description="Estimated seconds left.")
    loss: FiniteOrNone = Field(default=None, description="Latest training loss (absent when not finite).")
    tokens_per_second: FiniteOrNone = Field(
        default=None,
        description="Training throughput: non-padding tokens trained since the previous progress log, over the wall "
        "time since it, summed over workers (absent until measured, and for trainers that do not count tokens).",
    )
    metrics: FiniteMetrics = Field(
        default_factory=dict,
        description="Evaluation metrics (final ones once Succeeded); non-finite values are left out.",
    )
    checkpoint: str | None = Field(default=None, description="Final output model URI once Succeeded.")
    last_checkpoint: str | None = Field(default=None, description="Latest resumable checkpoint URI.")
    reason: str = Field(
        default="", description="CamelCase reason when Failed (e.g. InvalidDataset, QualityGateFailed)."
    )
    message: BoundedMessage = Field(default="", description="Human-readable detail.")
    updated_at: str | None = Field(default=None, description="RFC 3339 time of this report.")


# Exit code of the stage entrypoint for a permanent failure (any other non-zero code is retryable).
EXIT_PERMANENT_FAILURE = 3
