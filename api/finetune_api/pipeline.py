"""The controller's decisions, as one pure function: (job, status, observations, now) -> new status + actions.

No API calls and no clock reads here: the handler gathers observations of the current stage's child (RayJob or
local process) and stage ConfigMap, calls `reconcile`, then carries out the actions and writes the status.
Because the state lives in the status and in children with deterministic names, running `reconcile` again after a
crash or an operator restart reaches the same decisions: nothing is started twice and finished work never re-runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from finetune_api.reasons import PERMANENT, Reason
from finetune_api.render import (
    STAGE_CONFIG_MAX_BYTES,
    StageConfig,
    rayjob_name,
    render_stage,
    stage_config_json,
    stage_output_uri,
)
from finetune_api.report import StageReport
from finetune_api.runtime import Problem, effective_spec, validation_problems
from finetune_api.spec import FineTuneJobSpec, uri_scheme
from finetune_api.status import (
    FINISHED_PHASES,
    ConditionType,
    FineTuneJobStatus,
    JobPhase,
    RuntimeRecord,
    StagePhase,
    StageProgress,
    StageStatus,
)
from finetune_api.timeutil import parse_time, timestamp

RUNNING, SUCCEEDED, FAILED, SUSPENDED = (
    ConditionType.running,
    ConditionType.succeeded,
    ConditionType.failed,
    ConditionType.suspended,
)
READY, RECONCILING, STALLED = ConditionType.ready, ConditionType.reconciling, ConditionType.stalled


@dataclass(frozen=True)
class JobRef:
    """The identity of a FineTuneJob, as children and Events refer to it."""

    name: str
    namespace: str
    uid: str
    generation: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    resource_version: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> JobRef:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=meta.get("generation", 1),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            resource_version=meta.get("resourceVersion"),
        )


class ChildState(StrEnum):
    """What the executor sees of one stage attempt (a RayJob, or a local process)."""

    absent = "Absent"
    # Held by Kueue until its workload is admitted (a suspended RayJob with a queue label).
    queued = "Queued"
    starting = "Starting"
    initializing = "Initializing"
    running = "Running"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


LIVE_STATES = {ChildState.queued, ChildState.starting, ChildState.initializing, ChildState.running}


@dataclass(frozen=True)
class AttemptObservation:
    state: ChildState = ChildState.absent
    message: str = ""
    reason: str = ""
    # A failure no retry can fix (exit code 3, a RayJob KubeRay refuses).
    permanent: bool = False
    finished_at: datetime | None = None
    # When the child began bringing up its cluster (KubeRay's RayJob startTime): the start timeout counts from here.
    since: datetime | None = None


@dataclass(frozen=True)
class Observations:
    attempt: AttemptObservation = AttemptObservation()
    report: StageReport | None = None
    # (field path, name) of each Secret the job names, for any stage, that does not exist.
    missing_secrets: tuple[tuple[str, str], ...] = ()
    # Storage the attempt's pods share but that cannot be shared across nodes (a ReadWriteOnce claim), in words.
    storage_warnings: tuple[str, ...] = ()
    # The runtime `spec.runtimeRef` names, as read; None when it does not exist or is not needed (see `runtime_needed`).
    runtime: dict[str, Any] | None = None


@dataclass(frozen=True)
class Policy:
    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 600.0
    secret_recheck_seconds: float = 15.0
    # An attempt still initializing this long after `since` fails (0: never).
    start_timeout_seconds: float = 0.0
    # Whether local paths (`file://`, bare paths) may be used: only where the trainer runs on the operator's machine.
    local_paths_allowed: bool = True

    def retry_delay(self, failed_attempt: int) -> float:
        return min(self.retry_base_seconds * 2 ** (failed_attempt - 1), self.retry_max_seconds)


@dataclass(frozen=True)
class StartAttempt:
    """Ensure the attempt's child exists and runs (create it, or resume it when suspended)."""

    config: StageConfig
    # The spec the config was rendered from: the job's own, or its effective spec under a runtime.
    spec: FineTuneJobSpec
    # What is left of the job's activeDeadlineSeconds, for the child's own deadline (None: no deadline).
    active_deadline_seconds: int | None = None


@dataclass(frozen=True)
class StopAttempt:
    """Stop a running attempt: `suspend` keeps the child for a later resume, otherwise it is deleted."""

    stage: str
    attempt: int
    suspend: bool


@dataclass(frozen=True)
class DeleteJob:
    """Delete the FineTuneJob itself (ttlSecondsAfterFinished)."""


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str
    # What the Event is about, when more stable than its message: the same transition decided again (after a crash,
    # with fresher observations) has the same reason and key, and the operator names the Event by them.
    key: str = ""


@dataclass
class Decision:
    status: FineTuneJobStatus
    actions: list[StartAttempt | StopAttempt | DeleteJob] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def wake_in(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def event(self, reason: str, message: str, warning: bool = False, key: str = "") -> None:
        self.events.append(Event("Warning" if warning else "Normal", reason, message, key or message))


# Job fields still read from the job's own spec once its effective spec is fixed (the first stage has started).
LIVE_FIELDS = ("suspend", "ttlSecondsAfterFinished")


def effective_spec_fixed(status: FineTuneJobStatus) -> bool:
    """The runtime was merged and a stage has started: from now on the job runs `status.effectiveSpec` as recorded."""
    return status.effective_spec is not None and status.start_time is not None


def runtime_needed(spec_raw: dict[str, Any], status: FineTuneJobStatus) -> bool:
    """Whether this pass needs the runtime `spec.runtimeRef` names: until the first stage starts it is re-read on
    every pass, so a runtime created or fixed after the job still applies."""
    return isinstance(spec_raw.get("runtimeRef"), dict) and not effective_spec_fixed(status)


@dataclass(frozen=True)
class Resolution:
    """The spec a job runs with, or why there is none (problems, or a runtime that does not exist yet)."""

    spec: FineTuneJobSpec | None
    problems: tuple[Problem, ...] = ()
    runtime_missing: bool = False


def resolve_spec(
    job: JobRef, spec_raw: dict[str, Any], status: FineTuneJobStatus, runtime: dict[str, Any] | None
) -> Resolution:
    """The job's own spec; with a runtimeRef, the effective spec: merged from `runtime` until the first stage starts,
    then the one recorded in status (with the live fields from the job)."""
    ref = spec_raw.get("runtimeRef")
    if isinstance(ref, dict) and effective_spec_fixed(status):
        wire = {key: value for key, value in status.effective_spec.items() if key not in LIVE_FIELDS}
        wire.update({key: spec_raw[key] for key in LIVE_FIELDS if key in spec_raw})
        prefix = ["status", "effectiveSpec"]
    elif isinstance(ref, dict):
        if status.start_time is not None:
            message = "cannot be added once the job has started; create a new FineTuneJob instead"
            return Resolution(None, (Problem("spec.runtimeRef", message, Reason.INVALID_SPEC),))
        if runtime is None:
            return Resolution(None, runtime_missing=True)
        spec, problems = effective_spec(spec_raw, runtime, job.name, job.namespace)
        return Resolution(None if problems else spec, tuple(problems))
    else:
        wire, prefix = spec_raw, ["spec"]
    try:
        return Resolution(FineTuneJobSpec.model_validate(wire))
    except ValidationError as exc:
        return Resolution(None, tuple(validation_problems(exc, prefix, Reason.INVALID_SPEC)))


def local_path_problem(spec: FineTuneJobSpec) -> str | None:
    """Local paths name a file inside one Ray pod: nothing else sees it, and it is gone with the pod."""
    uris = [
        ("spec.model.source", spec.model.source),
        ("spec.model.tokenizer", spec.model.tokenizer),
        ("spec.storage.uri", spec.storage.uri),
    ]
    for index, stage in enumerate(spec.stages):
        for _, path, dataset in stage.data_sources():
            uris += [
                (f"spec.stages[{index}].{path}.uri", dataset.uri),
                (f"spec.stages[{index}].{path}.validationUri", dataset.validation_uri),
            ]
    uris += [(f"spec.evaluation.suites[{i}].uri", suite.uri) for i, suite in enumerate(spec.evaluation.suites)]
    local = [f"{path}: {uri!r}" for path, uri in uris if uri and uri_scheme(uri) == "file"]
    if not local:
        return None
    return (
        "; ".join(local) + ": a local path is inside one Ray pod and is lost with it; "
        "use s3://bucket/key or pvc://claim/path (local paths work with `finetune run` and the local executor)"
    )


def current_stage_index(status: FineTuneJobStatus) -> int:
    return next((i for i, s in enumerate(status.stages) if s.phase != StagePhase.succeeded.value), len(status.stages))


def attempt_to_observe(spec: FineTuneJobSpec, status: FineTuneJobStatus) -> tuple[str, int] | None:
    """The (stage, attempt) whose child and report the next reconcile needs; None when the job is finished."""
    if status.phase in FINISHED_PHASES:
        return None
    index = current_stage_index(status) if status.stages else 0
    if index >= len(spec.stages):
        return None
    attempts = status.stages[index].attempts if status.stages and index < len(status.stages) else 0
    # Attempt 1 is observed even before the status records it: a crash between create and status write leaves it.
    return spec.stages[index].name, max(attempts, 1)


def set_condition(
    status: FineTuneJobStatus,
    type_: ConditionType,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> bool:
    """Set a condition; lastTransitionTime moves (to `now`) only when its status changes. Returns whether it did."""
    before = status.condition(type_)
    old_value = before.status if before else None
    status.set_condition(type_, value, reason, message, generation)
    condition = status.condition(type_)
    if condition.status != old_value:
        condition.last_transition_time = timestamp(now)
        return True
    return False


class _Machine:
    """One reconcile pass; the methods share the job, the new status and the decision being built."""

    def __init__(self, job: JobRef, status: FineTuneJobStatus, obs: Observations, now: datetime, policy: Policy):
        self.job, self.status, self.obs, self.now, self.policy = job, status, obs, now, policy
        self.decision = Decision(status=status)

    def condition(self, type_: ConditionType, value: bool, reason: str, message: str = "") -> bool:
        return set_condition(self.status, type_, value, reason, message, self.now, self.job.generation)

    def run(self, spec_raw: dict[str, Any]) -> Decision:
        status = self.status
        status.observed_generation = self.job.generation
        self.spec_raw = spec_raw
        if status.phase in FINISHED_PHASES:
            self.expire()
            return self.decision
        resolution = resolve_spec(self.job, spec_raw, status, self.obs.runtime)
        if resolution.runtime_missing:
            self.wait_for_runtime(spec_raw["runtimeRef"])
            return self.decision
        if resolution.problems:
            policy = any(p.reason == Reason.POLICY_VIOLATION for p in resolution.problems)
            message = "; ".join(map(str, resolution.problems))
            self.fail(Reason.POLICY_VIOLATION if policy else Reason.INVALID_SPEC, message)
            return self.decision
        spec = resolution.spec
        if runtime_needed(spec_raw, status):
            self.record_runtime(spec)
        problem = self.sync_stage_list(spec)
        if problem:
            self.fail(Reason.INVALID_SPEC, problem)
            return self.decision
        problem = None if self.policy.local_paths_allowed else local_path_problem(spec)
        if problem:
            self.fail(Reason.INVALID_SPEC, problem)
            return self.decision
        self.spec = spec
        self.resume_if_unsuspended()
        index = current_stage_index(status)
        if self.deadline_exceeded(index):
            return self.decision
        while index < len(spec.stages) and self.step_stage(index):
            index += 1
            # The next stage has no child yet: whatever was observed belonged to the stage that just finished.
            self.obs = Observations(missing_secrets=self.obs.missing_secrets)
        if index >= len(spec.stages):
            self.succeed()
        status.progress = f"{sum(s.phase == StagePhase.succeeded.value for s in status.stages)}/{len(spec.stages)}"
        return self.decision

    def summarise(self) -> None:
        """kstatus's conditions from the phase: Ready once every stage succeeded, Reconciling while work is under way
        (starting, running, retrying, waiting for Secrets), Stalled once the job failed. A suspended job is none of
        these: it is where its spec asks it to be."""
        phase, status = self.status.phase, self.status
        running = status.condition(RUNNING)
        reason = running.reason if running else Reason.PENDING
        message = running.message if running else "waiting for the first pass"
        if phase == JobPhase.succeeded.value:
            done = status.condition(SUCCEEDED)
            self.condition(READY, True, done.reason, done.message)
            self.condition(RECONCILING, False, done.reason, "")
            self.condition(STALLED, False, done.reason, "")
        elif phase == JobPhase.failed.value:
            failed = status.condition(FAILED)
            self.condition(STALLED, True, failed.reason, failed.message)
            self.condition(READY, False, failed.reason, failed.message)
            self.condition(RECONCILING, False, failed.reason, "")
        elif phase == JobPhase.suspended.value:
            self.condition(READY, False, Reason.SUSPENDED, message)
            self.condition(RECONCILING, False, Reason.SUSPENDED, message)
            self.condition(STALLED, False, Reason.SUSPENDED, "")
        else:
            self.condition(READY, False, reason, message)
            self.condition(RECONCILING, True, reason, message)
            self.condition(STALLED, False, reason, "")

    # -- job level ------------------------------------------------------------------------------

    def record_runtime(self, spec: FineTuneJobSpec) -> None:
        """Write the effective spec (every default filled in) and the runtime it came from into the status."""
        runtime = self.obs.runtime
        meta = runtime.get("metadata") or {}
        self.status.runtime = RuntimeRecord(
            kind=runtime.get("kind", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid"),
            generation=meta.get("generation"),
            queue_name=(runtime.get("spec") or {}).get("queueName"),
        )
        self.status.effective_spec = spec.to_wire()

    def wait_for_runtime(self, ref: dict[str, Any]) -> None:
        kind, name = ref.get("kind"), ref.get("name")
        where = f"in namespace {self.job.namespace}" if kind == "FineTuneRuntime" else "(cluster-scoped)"
        message = f"waiting for {kind} {name!r} {where}, named by spec.runtimeRef: not found"
        if self.status.phase != JobPhase.suspended.value:
            self.status.phase = JobPhase.pending.value
        running = self.status.condition(RUNNING)
        if running is None or running.reason != Reason.RUNTIME_NOT_FOUND:
            self.decision.event(Reason.RUNTIME_NOT_FOUND, message, warning=True)
        self.condition(RUNNING, False, Reason.RUNTIME_NOT_FOUND, message)
        self.decision.wake_in(self.policy.secret_recheck_seconds)

    def sync_stage_list(self, spec: FineTuneJobSpec) -> str | None:
        wanted = [s.name for s in spec.stages]
        have = [s.name for s in self.status.stages]
        if have == wanted:
            return None
        if any(s.attempts for s in self.status.stages):
            return (
                f"spec.stages: the stage list cannot change once the job has started "
                f"(started with {', '.join(have)}; now {', '.join(wanted)}); create a new FineTuneJob instead"
            )
        self.status.stages = [StageStatus(name=s.name, type=s.type) for s in spec.stages]
        return None

    def resume_if_unsuspended(self) -> None:
        suspended = self.status.condition(SUSPENDED)
        if self.spec.suspend or suspended is None or suspended.status != "True":
            return
        if self.status.start_time:
            since = max(parse_time(suspended.last_transition_time), parse_time(self.status.start_time))
            self.status.suspended_seconds += round(max((self.now - since).total_seconds(), 0.0))
        self.condition(SUSPENDED, False, Reason.RESUMED, "spec.suspend is false: continuing from the latest checkpoint")
        self.decision.event(Reason.RESUMED, "resumed: continuing from the latest checkpoint")

    def active_seconds(self) -> float:
        started = parse_time(self.status.start_time)
        active = (self.now - started).total_seconds() - self.status.suspended_seconds
        suspended = self.status.condition(SUSPENDED)
        if suspended is not None and suspended.status == "True":
            active -= max((self.now - max(parse_time(suspended.last_transition_time), started)).total_seconds(), 0.0)
        return active

    def deadline_exceeded(self, index: int) -> bool:
        limit = self.spec.active_deadline_seconds
        if not limit or not self.status.start_time:
            return False
        active = self.active_seconds()
        if active < limit:
            if not self.spec.suspend:
                self.decision.wake_in(limit - active)
            return False
        if index < len(self.status.stages):
            stage = self.status.stages[index]
            if stage.attempts and self.obs.attempt.state in LIVE_STATES:
                self.decision.actions.append(StopAttempt(stage.name, stage.attempts, suspend=False))
        self.fail(
            Reason.DEADLINE_EXCEEDED,
            f"the job was active for {active:.0f}s, more than activeDeadlineSeconds={limit} (suspended time excluded)",
            index if index < len(self.status.stages) else None,
        )
        return True

    def fail(self, reason: str, message: str, index: int | None = None) -> None:
        status = self.status
        status.phase = JobPhase.failed.value
        status.completion_time = timestamp(self.now)
        if index is not None:
            stage = status.stages[index]
            stage.phase, stage.completion_time, stage.message = StagePhase.failed.value, timestamp(self.now), message
            status.current_stage = stage.name
            message = f"stage {stage.name}: {message}"
        self.condition(FAILED, True, reason, message)
        self.condition(RUNNING, False, reason, message)
        self.decision.event(reason, message, warning=True)
        self.expire()

    def succeed(self) -> None:
        status = self.status
        final = status.stages[-1].checkpoint if status.stages else None
        message = f"all {len(status.stages)} stages succeeded; final model: {final}"
        status.phase, status.completion_time, status.current_stage = JobPhase.succeeded.value, timestamp(self.now), None
        self.condition(SUCCEEDED, True, Reason.ALL_STAGES_SUCCEEDED, message)
        self.condition(RUNNING, False, Reason.ALL_STAGES_SUCCEEDED, message)
        self.decision.event(Reason.ALL_STAGES_SUCCEEDED, message)
        self.expire()

    def expire(self) -> None:
        """ttlSecondsAfterFinished, counted from the finishing condition's lastTransitionTime (restart-proof).

        Read from the raw spec so that it also applies to a job that failed with an invalid spec."""
        ttl = self.spec_raw.get("ttlSecondsAfterFinished")
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            return
        finished = next(
            (
                c
                for c in self.status.conditions
                if c.type in (SUCCEEDED.value, FAILED.value) and c.status == "True" and c.last_transition_time
            ),
            None,
        )
        if finished is None:
            return
        remaining = (parse_time(finished.last_transition_time) + timedelta(seconds=ttl) - self.now).total_seconds()
        if remaining <= 0:
            self.decision.actions.append(DeleteJob())
        else:
            self.decision.wake_in(remaining)

    # -- stage level ----------------------------------------------------------------------------

    def step_stage(self, index: int) -> bool:
        """Advance stage `index`; True when it has succeeded and the next stage may start."""
        stage = self.status.stages[index]
        self.status.current_stage = stage.name
        attempt = stage.attempts
        if attempt and stage.retry_at:
            return self.wait_to_retry(index)
        if attempt:
            self.mirror_report(stage, attempt)
            outcome = self.outcome(stage)
            if outcome == "succeeded":
                self.stage_succeeded(index)
                return True
            if outcome is not None:
                return self.attempt_failed(index, *outcome)
        if self.spec.suspend:
            self.suspend(stage)
            return False
        if not attempt or self.obs.attempt.state in (ChildState.absent, ChildState.suspended):
            self.start(index, max(attempt, 1))
            return False
        if self.start_timed_out(index):
            return False
        self.mark_running(index)
        return False

    def start_timed_out(self, index: int) -> bool:
        """Fail an attempt whose cluster stays initializing past the start timeout, with what its pods say."""
        child, limit = self.obs.attempt, self.policy.start_timeout_seconds
        if child.state != ChildState.initializing or not limit or child.since is None:
            return False
        waited = (self.now - child.since).total_seconds()
        if waited < limit:
            self.decision.wake_in(limit - waited)
            return False
        stage = self.status.stages[index]
        # The stuck cluster goes now: its pods would otherwise hold nodes (or quota) while the retry waits.
        self.decision.actions.append(StopAttempt(stage.name, stage.attempts, suspend=False))
        message = (
            f"the Ray cluster was not up {waited:.0f}s after it was requested: {child.message or 'no reason given'}"
        )
        self.attempt_failed(index, Reason.START_TIMEOUT, message, False)
        return True

    def mirror_report(self, stage: StageStatus, attempt: int) -> None:
        report = self.obs.report
        if report is None:
            return
        if report.last_checkpoint and report.last_checkpoint != stage.last_checkpoint:
            stage.last_checkpoint = report.last_checkpoint
            self.decision.event(Reason.CHECKPOINT_SAVED, f"stage {stage.name}: checkpoint {report.last_checkpoint}")
        if report.attempt != attempt:
            return
        stage.progress = StageProgress(
            step=report.step, total_steps=report.total_steps, epoch=report.epoch, eta_seconds=report.eta_seconds
        )
        stage.metrics.update(report.metrics)
        if report.loss is not None:
            stage.metrics["loss"] = report.loss

    def outcome(self, stage: StageStatus) -> str | tuple[str, str, bool] | None:
        """The attempt's end: "succeeded", (reason, message, permanent) for a failure, or None while it runs."""
        attempt = stage.attempts
        report = self.obs.report if self.obs.report and self.obs.report.attempt == attempt else None
        child = self.obs.attempt
        if (report and report.phase == "Succeeded") or child.state == ChildState.succeeded:
            return "succeeded"
        reported_failure = report is not None and report.phase == "Failed" and bool(report.reason)
        if reported_failure and report.reason in PERMANENT:
            return report.reason, report.message or report.reason, True
        if child.state == ChildState.absent and stage.phase != StagePhase.suspended.value:
            # Only a suspend removes a started attempt's child on purpose (under Kueue); a create is never skipped,
            # since the status records an attempt only after its child was created.
            return (
                Reason.ATTEMPT_LOST,
                f"attempt {attempt}'s {stage.ray_job or 'child'} disappeared after it started",
                False,
            )
        if child.state != ChildState.failed:
            return None
        reason = report.reason if reported_failure else (child.reason or Reason.STAGE_FAILED)
        message = (report.message if reported_failure and report.message else child.message) or "the attempt failed"
        return reason, message, child.permanent or reason in PERMANENT

    def stage_succeeded(self, index: int) -> None:
        stage = self.status.stages[index]
        report = self.obs.report if self.obs.report and self.obs.report.attempt == stage.attempts else None
        stage.phase, stage.completion_time = StagePhase.succeeded.value, timestamp(self.now)
        stage.checkpoint = (report.checkpoint if report else None) or stage_output_uri(self.spec.storage, stage.name)
        if stage.progress and stage.progress.total_steps:
            stage.progress.step, stage.progress.eta_seconds = stage.progress.total_steps, 0.0
        stage.message = f"succeeded after {stage.attempts} attempt(s); model: {stage.checkpoint}"
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(stage.metrics.items()) if k != "loss")
        self.decision.event(
            Reason.STAGE_SUCCEEDED,
            f"stage {stage.name} succeeded: {stage.checkpoint}" + (f" ({shown})" if shown else ""),
            key=f"{stage.name}/{stage.attempts}",
        )

    def attempt_failed(self, index: int, reason: str, message: str, permanent: bool) -> bool:
        stage = self.status.stages[index]
        attempt = stage.attempts
        if permanent:
            self.fail(reason, message, index)
            return False
        if attempt > self.spec.backoff_limit:
            self.fail(
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"attempt {attempt} failed and backoffLimit={self.spec.backoff_limit} retries are used up; last error: {message}",
                index,
            )
            return False
        if self.spec.suspend:
            self.suspend(stage)
            return False
        finished = self.obs.attempt.finished_at or self.now
        retry_at = finished + timedelta(seconds=self.policy.retry_delay(attempt))
        if self.now >= retry_at:
            self.start(index, attempt + 1)
            return False
        # Recorded once: the wait no longer depends on the failed child, which may be deleted meanwhile.
        stage.retry_at = timestamp(retry_at)
        wait = (retry_at - self.now).total_seconds()
        resume = stage.last_checkpoint or "the stage's start (no checkpoint yet)"
        text = (
            f"attempt {attempt} failed ({reason}: {message}); attempt {attempt + 1} resumes from {resume} "
            f"at {stage.retry_at}"
        )
        stage.message = text
        self.decision.event(
            Reason.RETRYING_FROM_CHECKPOINT, f"stage {stage.name}: {text}", warning=True, key=f"{stage.name}/{attempt}"
        )
        self.condition(RUNNING, True, Reason.RETRYING_FROM_CHECKPOINT, f"stage {stage.name}: {text}")
        self.decision.wake_in(wait)
        return False

    def wait_to_retry(self, index: int) -> bool:
        """A failed attempt waits until `retryAt`, then the next one starts (suspend still applies meanwhile)."""
        stage = self.status.stages[index]
        if self.spec.suspend:
            self.suspend(stage)
            return False
        remaining = (parse_time(stage.retry_at) - self.now).total_seconds()
        if remaining > 0:
            self.decision.wake_in(remaining)
            return False
        self.start(index, stage.attempts + 1)
        return False

    def suspend(self, stage: StageStatus) -> None:
        if stage.attempts and self.obs.attempt.state in LIVE_STATES:
            self.decision.actions.append(StopAttempt(stage.name, stage.attempts, suspend=True))
        if stage.attempts:
            stage.phase = StagePhase.suspended.value
            where = stage.last_checkpoint or "its start (no checkpoint yet)"
            message = f"spec.suspend is true: stage {stage.name} is stopped and will resume from {where}"
        else:
            message = "spec.suspend is true: nothing runs until it is false"
        stage.message = message
        self.status.phase = JobPhase.suspended.value
        if self.condition(SUSPENDED, True, Reason.SUSPENDED, message):
            self.decision.event(Reason.SUSPENDED, message)
        self.condition(RUNNING, False, Reason.SUSPENDED, message)

    def start(self, index: int, attempt: int) -> None:
        stage, spec = self.status.stages[index], self.spec
        # The job's Secrets and this stage's: a stage that starts in the pass where the one before it ended must not
        # go by what was observed for that one alone.
        missing = [
            (path, name)
            for path, name in self.obs.missing_secrets
            if not path.startswith("spec.stages[") or path.startswith(f"spec.stages[{index}].")
        ]
        if missing:
            self.wait_for_secrets(stage, missing)
            return
        config = render_stage(self.job.name, spec, stage.name, namespace=self.job.namespace, attempt=attempt)
        size = len(stage_config_json(config).encode())
        if size > STAGE_CONFIG_MAX_BYTES:
            self.fail(
                Reason.INVALID_SPEC,
                f"the rendered config is {size} bytes, more than the {STAGE_CONFIG_MAX_BYTES} that fit the ConfigMap "
                "carrying it to the trainer; keep large texts (chat templates, prompts) in the model or dataset",
                index,
            )
            return
        deadline = None
        if spec.active_deadline_seconds:
            left = spec.active_deadline_seconds - (self.active_seconds() if self.status.start_time else 0.0)
            deadline = max(math.ceil(left), 1)
        self.decision.actions.append(StartAttempt(config, spec, deadline))
        stage.retry_at = None
        new_attempt = attempt != stage.attempts
        stage.attempts, stage.ray_job, stage.phase = (
            attempt,
            rayjob_name(self.job.name, stage.name, attempt),
            StagePhase.running.value,
        )
        stage.start_time = stage.start_time or timestamp(self.now)
        self.status.start_time = self.status.start_time or timestamp(self.now)
        self.status.phase = JobPhase.running.value
        origin = f"resuming from {stage.last_checkpoint}" if stage.last_checkpoint else f"from {config.input_model}"
        message = f"stage {stage.name} ({index + 1}/{len(spec.stages)}) attempt {attempt} starting, {origin}"
        stage.message = message
        self.condition(RUNNING, True, Reason.STAGE_STARTING, message)
        if new_attempt:
            self.decision.event(Reason.STAGE_STARTING, message, key=f"{stage.name}/{attempt}")
            for warning in self.obs.storage_warnings:
                self.decision.event(Reason.STORAGE_NOT_SHARED, f"stage {stage.name}: {warning}", warning=True)

    def wait_for_secrets(self, stage: StageStatus, missing_secrets: list[tuple[str, str]]) -> None:
        missing = "; ".join(
            f"{path}: Secret {name!r} not found in namespace {self.job.namespace}" for path, name in missing_secrets
        )
        message = f"waiting for Secrets before starting stage {stage.name}: {missing}"
        stage.message = message
        if self.status.phase != JobPhase.suspended.value and not stage.attempts:
            self.status.phase = JobPhase.pending.value
        running = self.status.condition(RUNNING)
        if running is None or running.reason != Reason.SECRET_NOT_FOUND:
            self.decision.event(Reason.SECRET_NOT_FOUND, message, warning=True)
        self.condition(RUNNING, False, Reason.SECRET_NOT_FOUND, message)
        self.decision.wake_in(self.policy.secret_recheck_seconds)

    def mark_running(self, index: int) -> None:
        stage, child = self.status.stages[index], self.obs.attempt
        where = f"stage {stage.name} ({index + 1}/{len(self.spec.stages)}) attempt {stage.attempts}"
        if child.state == ChildState.queued:
            stage.phase, stage.message = StagePhase.queued.value, f"{where}: {child.message or 'queued in Kueue'}"
            self.status.phase = JobPhase.running.value
            self.condition(RUNNING, True, Reason.QUEUED, stage.message)
            return
        if child.state == ChildState.initializing:
            reason, message = (
                Reason.CLUSTER_INITIALIZING,
                f"{where}: Ray cluster initializing: {child.message or 'waiting for pods'}",
            )
        elif child.state == ChildState.starting:
            reason, message = (
                Reason.STAGE_STARTING,
                f"{where}: {child.message or 'waiting for the executor to pick it up'}",
            )
        else:
            progress = stage.progress
            steps = f" step {progress.step}/{progress.total_steps}" if progress and progress.total_steps else ""
            reason, message = Reason.STAGE_RUNNING, f"{where} running{steps}"
        stage.phase, stage.message = StagePhase.running.value, message
        self.status.phase = JobPhase.running.value
        self.condition(RUNNING, True, reason, message)


def reconcile(
    job: JobRef,
    spec: dict[str, Any],
    status: FineTuneJobStatus | dict[str, Any] | None,
    observations: Observations,
    now: datetime,
    policy: Policy = Policy(),
) -> Decision:
    """Decide what to do next for one FineTuneJob. Pure: the inputs are not modified."""
    if isinstance(status, FineTuneJobStatus):
        current = status.model_copy(deep=True)
    else:
        current = FineTuneJobStatus.model_validate(status or {})
    machine = _Machine(job, current, observations, now, policy)
    decision = machine.run(spec)
    machine.summarise()
    return decision
