"""The controller: reconcile passes over FineTuneJobs (observe, decide with the pure pipeline, execute, write status).

It is the only writer of the job's status. Watch events queue a job's key; a fixed number of workers take keys from
one work queue, each job by one worker at a time. Each pass observes the current stage's child and report, asks the
pure state machine (`finetune_api.pipeline`) what to do, does it, writes the status with a merge patch, and queues
the job again for when its next check is due.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_api.pipeline import (
    LIVE_STATES,
    AttemptObservation,
    ChildState,
    DeleteJob,
    Event,
    JobRef,
    Observations,
    Policy,
    StartAttempt,
    StopAttempt,
    attempt_to_observe,
    reconcile,
    resolve_spec,
    runtime_needed,
)
from finetune_api.reasons import Reason
from finetune_api.render import render_stage, stage_configmap_name
from finetune_api.report import REPORT_KEY, StageReport
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus
from finetune_operator import children
from finetune_operator.children import FINALIZER
from finetune_operator.executors import delete_artifacts, make_executor
from finetune_operator.kube import CLUSTER_RUNTIME, CONFIGMAP, FINETUNEJOB, PVC, RUNTIME, Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.settings import Settings
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

ERROR_RETRY_SECONDS = 5.0
# Condition set to False while the API server refuses the operator's status patches; the next accepted patch drops it.
STATUS_UPDATED = "StatusUpdated"
# Status codes of a create the API server refused for good (validation, admission webhook, Pod Security, quota).
REFUSED_STATUSES = (400, 403, 422)


def _api_message(exc: ApiException) -> str:
    """The API server's own message from a failed request's Status body."""
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status `old` into `new`: its top level holds only scalars and lists, replaced whole."""
    patch: dict[str, Any] = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch


@dataclasses.dataclass(frozen=True)
class Started:
    """A pass that has created its attempt's child, with the rest of it still to do (what the start left, the Events,
    the status write). Workers take it up after the keys waiting now, so in a burst every job gets its RayJob before
    any job's bookkeeping delays another's."""

    finish: Callable[[], tuple[float | None, FineTuneJobStatus]]


class Controller:
    def __init__(self, settings: Settings, kube: Kube, metrics: OperatorMetrics | None = None):
        self.settings, self.kube = settings, kube
        self.executor = make_executor(kube, settings)
        self.metrics = metrics or OperatorMetrics()
        self.policy = Policy(
            settings.retry_base_seconds,
            settings.retry_max_seconds,
            settings.secret_recheck_seconds,
            settings.start_timeout_seconds,
            local_paths_allowed=settings.executor == "local",
        )
        self.queue = WorkQueue()
        # Passes that created their attempt's child and left the rest for later (see `Started`), by key.
        self.unfinished: dict[tuple[str, str], Started] = {}
        # (namespace, name) -> the job as its last watch event showed it, and the status this operator last stored
        self.bodies: dict[tuple[str, str], dict[str, Any]] = {}
        self.known: dict[tuple[str, str], FineTuneJobStatus] = {}
        # (namespace, name) -> (generation, being deleted) when last queued: our own status writes need no pass
        self.generations: dict[tuple[str, str], tuple[int | None, bool]] = {}
        self.failures_seen: dict[tuple[str, str, int], datetime] = {}
        # job uid -> the API server's answer to its last refused status patch, while refusals last
        self.refused_patches: dict[str, str] = {}
        # Attempts whose child the API server refused to create: (job uid, stage, attempt) -> the refusal.
        self.refusals: dict[tuple[str, str, int], AttemptObservation] = {}

    # -- one reconcile pass ----------------------------------------------------------------------

    def observe(self, job: JobRef, spec_raw: dict[str, Any], status: FineTuneJobStatus) -> Observations:
        runtime = self.read_runtime(job, spec_raw["runtimeRef"]) if runtime_needed(spec_raw, status) else None
        spec = resolve_spec(job, spec_raw, status, runtime).spec
        if spec is None:
            return Observations(runtime=runtime)
        target = attempt_to_observe(spec, status)
        if target is None:
            return Observations()
        stage, attempt = target
        index = next(i for i, s in enumerate(spec.stages) if s.name == stage)
        if index >= len(status.stages) or not status.stages[index].attempts:
            # Nothing of this stage was started yet (as far as the status knows): skip two GETs. A child left by a crash
            # between create and status write is adopted by the idempotent start, then observed on the next pass.
            child, report = AttemptObservation(), None
        else:
            child, report = self.executor.observe(job, stage, attempt), self.read_report(job, stage)
            refusal = self.refusals.get((job.uid, stage, attempt))
            if refusal is not None and child.state == ChildState.absent:
                child = refusal
        if child.state in (ChildState.failed, ChildState.absent) and child.finished_at is None:
            # Backoff needs a fixed start: when the child carries no end time, the first sighting of the failure is it.
            seen = self.failures_seen.setdefault((job.uid, stage, attempt), datetime.now(UTC))
            child = dataclasses.replace(child, finished_at=seen)
        missing: list[tuple[str, str]] = []
        ending = report is not None and report.attempt == attempt and report.phase in ("Succeeded", "Failed")
        if child.state not in LIVE_STATES or ending:
            # Only before (re)starting an attempt: a running one already has what it needs. An attempt whose report
            # says it ended counts as not running (its RayJob may not say so yet), and the check covers every
            # stage: the next one may start in this same pass.
            present: dict[str, bool] = {}
            for path, name in children.referenced_secrets(spec):
                if name not in present:
                    present[name] = self.kube.exists(("v1", "Secret"), job.namespace, name)
                if not present[name]:
                    missing.append((path, name))
        warnings = self.storage_warnings(job, spec, stage) if child.state not in LIVE_STATES else []
        return Observations(
            attempt=child,
            report=report,
            missing_secrets=tuple(missing),
            storage_warnings=tuple(warnings),
            runtime=runtime,
        )

    def storage_warnings(self, job: JobRef, spec: FineTuneJobSpec, stage: str) -> list[str]:
        """`pvc://` claims of the stage that its Ray pods, on different nodes, cannot all mount."""
        if self.settings.executor != "kuberay":
            return []
        config = render_stage(job.name, spec, stage, namespace=job.namespace)
        warnings = []
        for claim in children.pvc_claims(config):
            pvc = self.kube.get(PVC, job.namespace, claim)
            modes = ((pvc or {}).get("spec") or {}).get("accessModes") or []
            if pvc is not None and "ReadWriteMany" not in modes:
                warnings.append(
                    f"pvc://{claim}: PersistentVolumeClaim {claim!r} is {', '.join(modes) or 'without access modes'}; "
                    f"the head and {config.resources.workers} worker pod(s) all mount it, and pods on a second node "
                    "cannot attach it: use a ReadWriteMany claim (or s3://)"
                )
        return warnings

    def read_runtime(self, job: JobRef, ref: dict[str, Any]) -> dict[str, Any] | None:
        """The runtime a job names: a FineTuneRuntime in the job's namespace, or a ClusterFineTuneRuntime."""
        name = ref.get("name")
        if not isinstance(name, str) or not name:
            return None
        try:
            if ref.get("kind") == CLUSTER_RUNTIME[1]:
                return self.kube.get(CLUSTER_RUNTIME, None, name)
            return self.kube.get(RUNTIME, job.namespace, name)
        except ApiException as exc:
            if exc.status != 403:
                raise
            # Namespace-scoped installs may not read ClusterFineTuneRuntimes: the job waits as for a missing one.
            log.warning("%s/%s: not allowed to read %s %s", job.namespace, job.name, ref.get("kind"), name)
            return None

    @staticmethod
    def with_runtime_queue(job: JobRef, status: FineTuneJobStatus) -> JobRef:
        """The job as its children see it: the runtime's Kueue queue, when it names one, replaces the job's label."""
        queue = status.runtime.queue_name if status.runtime else None
        if not queue:
            return job
        return dataclasses.replace(job, labels={**job.labels, children.KUEUE_QUEUE_LABEL: queue})

    def read_report(self, job: JobRef, stage: str) -> StageReport | None:
        configmap = self.kube.get(CONFIGMAP, job.namespace, stage_configmap_name(job.name, stage))
        text = ((configmap or {}).get("data") or {}).get(REPORT_KEY)
        if not text:
            return None
        try:
            return StageReport.model_validate_json(text)
        except ValidationError as exc:
            log.warning("%s/%s: ignoring an unreadable report for stage %s: %s", job.namespace, job.name, stage, exc)
            return None

    def execute(self, job: JobRef, action: StartAttempt | StopAttempt | DeleteJob) -> Callable[[], None] | None:
        """Carry out one action; returns what a start left for later (see `Executor.start`)."""
        if isinstance(action, StartAttempt):
            config = action.config
            try:
                return self.executor.start(job, action.spec, config, action.active_deadline_seconds)
            except ApiException as exc:
                if exc.status not in REFUSED_STATUSES:
                    raise
                # Admission (a webhook, Pod Security, a quota) said no: the attempt fails with its words, visible in
                # status and as an Event, and is retried with backoff like any failed attempt.
                message = f"the API server refused a child of attempt {config.attempt}: {_api_message(exc)}"
                self.refusals[(job.uid, config.stage.name, config.attempt)] = AttemptObservation(
                    ChildState.failed, message, Reason.CHILD_REFUSED, finished_at=datetime.now(UTC)
                )
                self.post_event(job, "Warning", Reason.CHILD_REFUSED, f"stage {config.stage.name}: {message}")
        elif isinstance(action, StopAttempt):
            self.executor.stop(job, action.stage, action.attempt, action.suspend)
        else:
            self.post_event(
                job, "Normal", Reason.TTL_EXPIRED, "ttlSecondsAfterFinished passed: deleting the FineTuneJob"
            )
            self.kube.delete(FINETUNEJOB, job.namespace, job.name)
        return None

    def post_event(self, job: JobRef, type_: str, reason: str, message: str, key: str = "") -> None:
        try:
            manifest = children.event(job, type_, reason, message, datetime.now(UTC), key=key)
            if self.kube.create_if_absent(manifest):
                self.metrics.events.labels(type=type_, reason=reason).inc()
        except ApiException as exc:
            # Events are best effort: a failure to post one must not stop the reconcile.
            log.warning("%s/%s: could not post event %s: %s", job.namespace, job.name, reason, exc.reason)

    def status_patch_refused(self, job: JobRef, stored: dict[str, Any], exc: ApiException) -> None:
        """A refused status patch leaves the status frozen: say why with a Warning Event and a `StatusUpdated=False`
        condition, sent in a patch that carries nothing else. Both once per distinct refusal, not on every pass."""
        detail = f"{exc.status} {exc.reason}: {str(exc.body or '').strip()[:500]}"
        if self.refused_patches.get(job.uid) == detail:
            return
        self.refused_patches[job.uid] = detail
        self.post_event(
            job, "Warning", Reason.STATUS_PATCH_REFUSED, f"the API server refused a status update: {detail}"
        )
        status = FineTuneJobStatus.model_validate(stored)
        status.set_condition(STATUS_UPDATED, False, Reason.STATUS_PATCH_REFUSED, detail)
        try:
            self.kube.patch_job_status(job.namespace, job.name, {"conditions": status.to_wire()["conditions"]})
        except ApiException as again:
            log.warning("%s/%s: the condition patch was refused too: %s", job.namespace, job.name, again.reason)

    def reconcile_once(
        self, body: dict[str, Any], known: FineTuneJobStatus | None
    ) -> tuple[float | None, FineTuneJobStatus] | Started:
        """One pass for one job (blocking; runs in a worker thread). Returns (requeue delay, status now stored), or,
        when a start left work for later, `Started` with the rest of the pass."""
        job = JobRef.from_body(body)
        spec_raw = body.get("spec") or {}
        current = known if known is not None else FineTuneJobStatus.model_validate(body.get("status") or {})
        observations = self.observe(self.with_runtime_queue(job, current), spec_raw, current)
        decision = reconcile(job, spec_raw, current, observations, datetime.now(UTC), self.policy)
        new_attempt = any(event.reason == Reason.STAGE_STARTING for event in decision.events)
        starts = [action for action in decision.actions if isinstance(action, StartAttempt)]
        if starts and self.needs_finalizer(starts[0].spec):
            self.ensure_finalizer(job, body)
        rests = []
        for action in decision.actions:
            rest = self.execute(self.with_runtime_queue(job, decision.status), action)
            if rest is not None:
                rests.append(rest)
            if new_attempt and isinstance(action, StartAttempt):
                self.metrics.stage_attempts.labels(type=action.config.stage.type).inc()
        if any(isinstance(action, DeleteJob) for action in decision.actions):
            return None, current
        stored = known.to_wire() if known is not None else (body.get("status") or {})
        delay = decision.requeue_after
        if any((job.uid, a.config.stage.name, a.config.attempt) in self.refusals for a in starts):
            # Record the refusal in status on the next pass, now.
            delay = 0.0
        live = observations.attempt.state in LIVE_STATES or bool(starts)
        if self.executor.poll_seconds and live:
            delay = min(delay, self.executor.poll_seconds) if delay is not None else self.executor.poll_seconds
        # Only what the rest needs is kept: many passes may wait in the queue for their second half.
        finish = functools.partial(
            self.finish_pass, job, stored, current, decision.status, decision.events, delay, rests
        )
        return Started(finish) if rests else finish()

    def finish_pass(
        self,
        job: JobRef,
        stored: dict[str, Any],
        current: FineTuneJobStatus,
        status: FineTuneJobStatus,
        events: list[Event],
        delay: float | None,
        rests: list[Callable[[], None]],
    ) -> tuple[float | None, FineTuneJobStatus]:
        """The rest of a pass: what starting the children left, the Events, the status write. Returns (requeue delay,
        status now stored)."""
        for rest in rests:
            rest()
        # A patch that goes through ends a refusal: the condition saying so is dropped.
        status.conditions = [c for c in status.conditions if c.type != STATUS_UPDATED]
        patch = merge_patch(stored, status.to_wire())
        # Events go out before the status that records their transition: if this process dies in between, the next
        # pass decides the same transition again and re-posts the same (deterministically named) Event.
        for event in events:
            self.post_event(job, event.type, event.reason, event.message, key=event.key)
        if patch:
            try:
                self.kube.patch_job_status(job.namespace, job.name, patch)
                self.refused_patches.pop(job.uid, None)
            except ApiException as exc:
                if exc.status == 404:
                    return None, current  # deleted meanwhile: its DELETED event ends its state here
                if exc.status != 409:  # a conflict is not a refusal of what the patch says
                    self.status_patch_refused(job, stored, exc)
                raise
        self.metrics.observe_phase(job.uid, status.phase)
        return delay, status

    def needs_finalizer(self, spec: FineTuneJobSpec) -> bool:
        """Whether deleting the job needs this operator: owner references let the garbage collector delete every
        child object, but not stop a local process or delete artifacts."""
        return self.settings.executor == "local" or not spec.storage.retain_on_delete

    def ensure_finalizer(self, job: JobRef, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        finalizers = meta.get("finalizers") or []
        if FINALIZER not in finalizers:
            # resourceVersion makes the merge patch conditional: a concurrent change of the list fails it (409).
            patch = {"metadata": {"finalizers": [*finalizers, FINALIZER], "resourceVersion": meta["resourceVersion"]}}
            self.kube.patch(FINETUNEJOB, job.namespace, job.name, patch)

    def finalize(self, body: dict[str, Any]) -> None:
        """The job is being deleted: clean up, then let it go."""
        self.cleanup(body)
        meta = body["metadata"]
        rest = [name for name in meta.get("finalizers") or [] if name != FINALIZER]
        patch = {"metadata": {"finalizers": rest or None, "resourceVersion": meta["resourceVersion"]}}
        try:
            self.kube.patch(FINETUNEJOB, meta["namespace"], meta["name"], patch)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def cleanup(self, body: dict[str, Any]) -> None:
        """Stop and delete the job's children; delete artifacts only with retainOnDelete: false."""
        job = JobRef.from_body(body)
        try:
            self.executor.cleanup(job)
        except ApiException as exc:
            self.post_event(
                job, "Warning", Reason.CLEANUP_FAILED, f"deleting the job's children failed, retrying: {exc.reason}"
            )
            raise
        status = FineTuneJobStatus.model_validate(body.get("status") or {})
        # A job under a runtime that never started has no effective spec, and so no artifacts.
        spec = resolve_spec(job, body.get("spec") or {}, status, None).spec
        if spec is None:
            return
        if not spec.storage.retain_on_delete:
            try:
                status = FineTuneJobStatus.model_validate(body.get("status") or {})
            except ValidationError:
                status = None  # unknown progress: delete only the directories stages write
            lines = delete_artifacts(spec, self.settings.pvc_root, status)
            self.post_event(
                job, "Normal", Reason.ARTIFACTS_DELETED, "storage.retainOnDelete is false: " + "; ".join(lines)
            )

    # -- the work queue --------------------------------------------------------------------------

    def job_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A FineTuneJob watch event (on the event loop): remember the body; queue it when its spec changed."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"))
        if event_type == "DELETED":
            self.forget(key, meta.get("uid"))
            return
        self.bodies[key] = body
        seen = (meta.get("generation"), bool(meta.get("deletionTimestamp")))
        if event_type in (None, "ADDED") or self.generations.get(key) != seen:
            self.generations[key] = seen
            self.queue.add(key)

    def child_event(self, namespace: str, job_name: str) -> None:
        """A RayJob or stage ConfigMap of the job changed (on the event loop)."""
        key = (namespace, job_name)
        if key in self.bodies:
            self.queue.add(key)

    def forget(self, key: tuple[str, str], uid: str | None) -> None:
        for table in (self.bodies, self.known, self.generations, self.unfinished):
            table.pop(key, None)
        self.queue.forget(key)
        if uid:
            self.metrics.observe_phase(uid, None)
            self.executor.forget(uid)
            self.refused_patches.pop(uid, None)
            for seen in (self.failures_seen, self.refusals):
                for stale in [stale for stale in seen if stale[0] == uid]:
                    del seen[stale]

    async def run_workers(self, workers: int) -> None:
        """`workers` passes at once, each key by one worker at a time; runs until cancelled."""
        await asyncio.gather(*(self._work() for _ in range(workers)))

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            deferred = False
            try:
                deferred = await self._process(key)
            finally:
                if not deferred:
                    self.queue.done(key)

    async def _process(self, key: tuple[str, str]) -> bool:
        """One pass, or the rest of one; True when the rest is left for later (the key stays held until then)."""
        started, deferred = time.monotonic(), False
        try:
            rest = self.unfinished.pop(key, None)
            if rest is not None:
                result = await asyncio.to_thread(rest.finish)
            else:
                body = self.bodies.get(key)
                if body is None:
                    return False
                snapshot = copy.deepcopy(body)
                if (snapshot.get("metadata") or {}).get("deletionTimestamp"):
                    if FINALIZER in (snapshot["metadata"].get("finalizers") or []):
                        await asyncio.to_thread(self.finalize, snapshot)
                    return False
                result = await asyncio.to_thread(self.reconcile_once, snapshot, self.known.get(key))
                if isinstance(result, Started):
                    self.unfinished[key] = result
                    self.queue.defer(key)
                    deferred = True
                    return True
            delay, self.known[key] = result
            self.metrics.reconciles.labels(result="ok").inc()
        except Exception as exc:  # noqa: BLE001 - any failure is retried
            self.metrics.reconciles.labels(result="error").inc()
            self.metrics.errors.labels(kind=type(exc).__name__).inc()
            # The client's ApiException prints its response headers too: the status and the server's message say it.
            problem = (
                f"{exc.status} {_api_message(exc)}"
                if isinstance(exc, ApiException)
                else (str(exc) or type(exc).__name__)
            )
            log.warning("%s/%s: reconcile failed, retrying in %.0fs: %s", *key, ERROR_RETRY_SECONDS, problem)
            self.known.pop(key, None)
            delay = ERROR_RETRY_SECONDS
        finally:
            if not deferred:
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        if key in self.bodies:
            resync = self.settings.resync_seconds
            self.queue.add_after(key, resync if delay is None else min(delay, resync))
        return False
