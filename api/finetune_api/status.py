"""FineTuneJob status: written by the operator (on the cluster) or by `finetune run` (locally), in the same shape.

Kubernetes conventions: `conditions` with type/status/reason/message/lastTransitionTime, `observedGeneration`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from finetune_api.spec import ApiModel, StageType
from finetune_api.timeutil import now_rfc3339


class JobPhase(StrEnum):
    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


class StagePhase(StrEnum):
    pending = "Pending"
    # Kueue holds the stage's RayJob until its workload is admitted.
    queued = "Queued"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


FINISHED_PHASES = {JobPhase.succeeded.value, JobPhase.failed.value}


class ConditionType(StrEnum):
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"
    # kstatus's summary (sigs.k8s.io/cli-utils/pkg/kstatus), read by Flux, Argo CD and `kubectl wait` as they are.
    ready = "Ready"
    reconciling = "Reconciling"
    stalled = "Stalled"


class Condition(ApiModel):
    type: str = Field(
        description="Condition type: Running, Succeeded, Failed, Suspended, and kstatus's Ready, Reconciling, Stalled."
    )
    status: str = Field(description="True, False or Unknown.", pattern="^(True|False|Unknown)$")
    reason: str = Field(default="", description="CamelCase reason, stable for machines (see docs/troubleshooting.md).")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="The spec generation this condition was computed from."
    )


class StageProgress(ApiModel):
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds to the end of the stage.")


class StageStatus(ApiModel):
    name: str = Field(description="Stage name.")
    type: StageType = Field(description="Stage type.")
    phase: StagePhase = Field(
        default=StagePhase.pending,
        description="Pending, Queued (held by Kueue), Running, Succeeded, Failed or Suspended.",
    )
    attempts: int = Field(default=0, description="Attempts started so far (1 on a first run).")
    ray_job: str | None = Field(default=None, description="Name of the RayJob running the current attempt.")
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the stage succeeded or finally failed.")
    checkpoint: str | None = Field(
        default=None, description="URI of the stage's output model once it succeeded; the next stage's input."
    )
    last_checkpoint: str | None = Field(
        default=None, description="URI of the latest resumable checkpoint written while running."
    )
    progress: StageProgress | None = Field(default=None, description="Step counter of the running attempt.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Evaluation metrics reported by the stage (e.g. eval_loss_after)."
    )
    retry_at: str | None = Field(
        default=None, description="When the next attempt starts, while the current one has failed and waits to retry."
    )
    message: str = Field(default="", description="Why the stage is in its phase.")


class RuntimeRecord(ApiModel):
    kind: str = Field(description="FineTuneRuntime or ClusterFineTuneRuntime.")
    name: str = Field(description="The runtime's name.")
    uid: str | None = Field(default=None, description="The runtime object's uid.")
    generation: int | None = Field(default=None, description="The runtime's metadata.generation that was merged.")
    queue_name: str | None = Field(
        default=None, description="The runtime's `queueName`: the Kueue LocalQueue the job's stages are queued in."
    )


class FineTuneJobStatus(ApiModel):
    phase: JobPhase = Field(default=JobPhase.pending, description="Pending, Running, Succeeded, Failed or Suspended.")
    # Keyed lists, for server-side apply and per-item patches (the Kubernetes convention for conditions).
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Running, Succeeded, Failed and Suspended conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    current_stage: str | None = Field(default=None, description="The stage running now, or the one that failed.")
    progress: str | None = Field(default=None, description="Stages done out of the total, e.g. `2/4`.")
    start_time: str | None = Field(default=None, description="When the first stage started.")
    suspended_seconds: int = Field(
        default=0, description="Seconds spent suspended after the first start; excluded from activeDeadlineSeconds."
    )
    completion_time: str | None = Field(default=None, description="When the job succeeded or failed.")
    stages: list[StageStatus] = Field(
        default_factory=list,
        description="One entry per stage, in order.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    runtime: RuntimeRecord | None = Field(
        default=None, description="The runtime (`spec.runtimeRef`) whose defaults and policy `effectiveSpec` came from."
    )
    effective_spec: dict[str, Any] | None = Field(
        default=None,
        description=(
            "With `spec.runtimeRef`: the runtime's defaults merged with the job's fields, every default written out. "
            "Recomputed until the first stage starts, then fixed: stages render from it, so editing or deleting the "
            "runtime never changes a started job. Only `suspend` and `ttlSecondsAfterFinished` are still read from "
            "the job's spec after that."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    def stage(self, name: str) -> StageStatus:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def set_condition(
        self,
        type_: ConditionType | str,
        status: bool | str,
        reason: str,
        message: str = "",
        generation: int | None = None,
    ) -> bool:
        """Set one condition; lastTransitionTime moves only when `status` changes. Returns whether anything changed."""
        type_value = type_.value if isinstance(type_, ConditionType) else type_
        status_value = status if isinstance(status, str) else ("True" if status else "False")
        for condition in self.conditions:
            if condition.type == type_value:
                changed = (condition.status, condition.reason, condition.message) != (status_value, reason, message)
                if condition.status != status_value:
                    condition.last_transition_time = now_rfc3339()
                condition.status, condition.reason, condition.message = status_value, reason, message
                condition.observed_generation = generation
                return changed
        self.conditions.append(
            Condition(
                type=type_value,
                status=status_value,
                reason=reason,
                message=message,
                last_transition_time=now_rfc3339(),
                observed_generation=generation,
            )
        )
        return True

    def condition(self, type_: ConditionType | str) -> Condition | None:
        type_value = type_.value if isinstance(type_, ConditionType) else type_
        return next((c for c in self.conditions if c.type == type_value), None)
