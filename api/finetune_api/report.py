"""The progress channel from a running stage to whoever owns the status.

The trainer writes one StageReport (JSON) per stage: into the per-stage ConfigMap on a cluster (key `report.json`),
or into a file locally. The operator reads it and mirrors it into FineTuneJob.status; it is the only status writer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune_api.spec import ApiModel

REPORT_KEY = "report.json"


class StageReport(ApiModel):
    phase: Literal["Running", "Succeeded", "Failed"] = Field(description="Phase of the attempt as the trainer sees it.")
    attempt: int = Field(default=1, description="Attempt that wrote this report.")
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds left.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Evaluation metrics (final ones once Succeeded)."
    )
    checkpoint: str | None = Field(default=None, description="Final output model URI once Succeeded.")
    last_checkpoint: str | None = Field(default=None, description="Latest resumable checkpoint URI.")
    reason: str = Field(
        default="", description="CamelCase reason when Failed (e.g. InvalidDataset, QualityGateFailed)."
    )
    message: str = Field(default="", description="Human-readable detail.")
    updated_at: str | None = Field(default=None, description="RFC 3339 time of this report.")


# Exit code of the stage entrypoint for a permanent failure (any other non-zero code is retryable).
EXIT_PERMANENT_FAILURE = 3
