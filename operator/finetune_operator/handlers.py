"""kopf wiring: one daemon per FineTuneJob runs the reconcile loop; watch events on the job and its children wake it.

The daemon is the only writer of the job's status. Each pass observes the current stage's child and report,
asks the pure state machine (`reconcile.py`) what to do, does it, and writes the status. A finalizer (kopf's, added
because of the daemon and the delete handler) cleans up children when the job is deleted.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import socket
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf
from finetune_api.render import report_configmap_name
from finetune_api.report import REPORT_KEY, StageReport
from finetune_api.spec import GROUP, PLURAL, VERSION, FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_operator import builders, reasons
from finetune_operator.builders import JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL, JobRef
from finetune_operator.executors import delete_artifacts, make_executor
from finetune_operator.kube import CONFIGMAP, FINETUNEJOB, Kube
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import (
    LIVE_STATES,
    AttemptObservation,
    ChildState,
    DeleteJob,
    Observations,
    Policy,
    StartAttempt,
    StopAttempt,
    attempt_to_observe,
    reconcile,
)
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)

ERROR_RETRY_SECONDS = 5.0


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status `old` into `new`: its top level holds only scalars and lists, replaced whole."""
    patch: dict[str, Any] = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch


class Wakeups:
    """One asyncio.Event per job (namespace, name): set by watch events, awaited by the job's daemon."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], asyncio.Event] = {}
        self.generations: dict[tuple[str, str], int | None] = {}

    def register(self, key: tuple[str, str]) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    def unregister(self, key: tuple[str, str]) -> None:
        self.events.pop(key, None)
        self.generations.pop(key, None)

    def wake(self, key: tuple[str, str]) -> None:
        event = self.events.get(key)
        if event is not None:
            event.set()


class Controller:
    def __init__(self, settings: Settings, kube: Kube, metrics: OperatorMetrics | None = None):
        self.settings, self.kube = settings, kube
        self.executor = make_executor(kube, settings)
        self.metrics = metrics or OperatorMetrics()
        self.policy = Policy(settings.retry_base_seconds, settings.retry_max_seconds, settings.secret_recheck_seconds)
        self.wakeups = Wakeups()
        self.failures_seen: dict[tuple[str, str, int], datetime] = {}

    # -- one reconcile pass ----------------------------------------------------------------------

    def observe(self, job: JobRef, spec_raw: dict[str, Any], status: FineTuneJobStatus) -> Observations:
        try:
            spec = FineTuneJobSpec.model_validate(spec_raw)
        except ValidationError:
            return Observations()
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
        if child.state == ChildState.failed and child.finished_at is None:
            # Backoff needs a fixed start: when the child carries no end time, the first sighting of the failure is it.
            seen = self.failures_seen.setdefault((job.uid, stage, attempt), datetime.now(UTC))
            child = dataclasses.replace(child, finished_at=seen)
        missing: list[tuple[str, str]] = []
        if child.state not in LIVE_STATES:
            # Only before (re)starting an attempt: a running one already has what it needs.
            present: dict[str, bool] = {}
            for path, name in builders.referenced_secrets(spec, index):
                if name not in present:
                    present[name] = self.kube.exists(("v1", "Secret"), job.namespace, name)
                if not present[name]:
                    missing.append((path, name))
        return Observations(attempt=child, report=report, missing_secrets=tuple(missing))

    def read_report(self, job: JobRef, stage: str) -> StageReport | None:
        configmap = self.kube.get(CONFIGMAP, job.namespace, report_configmap_name(job.name, stage))
        text = ((configmap or {}).get("data") or {}).get(REPORT_KEY)
        if not text:
            return None
        try:
            return StageReport.model_validate_json(text)
        except ValidationError as exc:
            log.warning("%s/%s: ignoring an unreadable report for stage %s: %s", job.namespace, job.name, stage, exc)
            return None

    def execute(self, job: JobRef, spec_raw: dict[str, Any], action: StartAttempt | StopAttempt | DeleteJob) -> None:
        if isinstance(action, StartAttempt):
            self.executor.start(job, FineTuneJobSpec.model_validate(spec_raw), action.config)
        elif isinstance(action, StopAttempt):
            self.executor.stop(job, action.stage, action.attempt, action.suspend)
        else:
            self.post_event(
                job, "Normal", reasons.TTL_EXPIRED, "ttlSecondsAfterFinished passed: deleting the FineTuneJob"
            )
            self.kube.delete(FINETUNEJOB, job.namespace, job.name)

    def post_event(self, job: JobRef, type_: str, reason: str, message: str) -> None:
        try:
            self.kube.create(builders.event(job, type_, reason, message, datetime.now(UTC)))
        except ApiException as exc:
            # Events are best effort: a failure to post one must not stop the reconcile.
            log.warning("%s/%s: could not post event %s: %s", job.namespace, job.name, reason, exc.reason)

    def reconcile_once(
        self, body: dict[str, Any], known: FineTuneJobStatus | None
    ) -> tuple[float | None, FineTuneJobStatus]:
        """One pass for one job (blocking; runs in a worker thread). Returns (requeue delay, status now stored)."""
        job = JobRef.from_body(body)
        spec_raw = body.get("spec") or {}
        current = known if known is not None else FineTuneJobStatus.model_validate(body.get("status") or {})
        observations = self.observe(job, spec_raw, current)
        decision = reconcile(job, spec_raw, current, observations, datetime.now(UTC), self.policy)
        for action in decision.actions:
            self.execute(job, spec_raw, action)
        if any(isinstance(action, DeleteJob) for action in decision.actions):
            return None, current
        stored = known.to_wire() if known is not None else (body.get("status") or {})
        patch = merge_patch(stored, decision.status.to_wire())
        if patch:
            self.kube.patch_job_status(job.namespace, job.name, patch)
        for event in decision.events:
            self.post_event(job, event.type, event.reason, event.message)
        self.metrics.observe_phase(job.uid, decision.status.phase)
        delay = decision.requeue_after
        live = observations.attempt.state in LIVE_STATES or any(isinstance(a, StartAttempt) for a in decision.actions)
        if self.executor.poll_seconds and live:
            delay = min(delay, self.executor.poll_seconds) if delay is not None else self.executor.poll_seconds
        return delay, decision.status

    def cleanup(self, body: dict[str, Any]) -> None:
        """Finalizer work: stop and delete the job's children; delete artifacts only with retainOnDelete: false."""
        job = JobRef.from_body(body)
        self.metrics.observe_phase(job.uid, None)
        for key in [key for key in self.failures_seen if key[0] == job.uid]:
            del self.failures_seen[key]
        try:
            self.executor.cleanup(job)
        except ApiException as exc:
            self.post_event(
                job, "Warning", reasons.CLEANUP_FAILED, f"deleting the job's children failed, retrying: {exc.reason}"
            )
            raise
        try:
            spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return
        if not spec.storage.retain_on_delete:
            lines = delete_artifacts(spec, self.settings.pvc_root)
            self.post_event(
                job, "Normal", reasons.ARTIFACTS_DELETED, "storage.retainOnDelete is false: " + "; ".join(lines)
            )

    # -- the daemon loop -------------------------------------------------------------------------

    async def run_job(self, body: kopf.Body, stopped: kopf.DaemonStopped, logger: logging.Logger) -> None:
        key = (body.metadata.namespace, body.metadata.name)
        wake = self.wakeups.register(key)
        known: FineTuneJobStatus | None = None
        try:
            while not stopped:
                wake.clear()
                snapshot = copy.deepcopy(dict(body))
                if snapshot["metadata"].get("deletionTimestamp"):
                    return
                try:
                    started = time.monotonic()
                    delay, known = await asyncio.to_thread(self.reconcile_once, snapshot, known)
                    self.metrics.reconciles.labels(result="ok").inc()
                    logger.debug(
                        "reconciled in %.3fs: phase %s, next pass in %s s",
                        time.monotonic() - started,
                        known.phase,
                        "-" if delay is None else f"{delay:.1f}",
                    )
                except Exception as exc:  # noqa: BLE001 - any failure is retried; kopf would otherwise end the daemon
                    self.metrics.reconciles.labels(result="error").inc()
                    self.metrics.errors.labels(kind=type(exc).__name__).inc()
                    logger.warning("reconcile failed, retrying in %.0fs: %s", ERROR_RETRY_SECONDS, exc)
                    delay, known = ERROR_RETRY_SECONDS, None
                timeout = self.settings.resync_seconds if delay is None else min(delay, self.settings.resync_seconds)
                await _wait_any(wake, stopped, timeout)
        finally:
            if self.wakeups.events.get(key) is wake:
                self.wakeups.unregister(key)


async def _wait_any(wake: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0.05), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def make_registry(controller: Controller) -> kopf.OperatorRegistry:
    """A fresh kopf registry with the controller's handlers (no module-level state: several operators may share a process)."""
    registry = kopf.OperatorRegistry()
    configuration = controller.kube.configuration
    children = {MANAGED_BY_LABEL: MANAGED_BY, JOB_LABEL: kopf.PRESENT}

    @kopf.on.login(id="login", registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
            "authorization"
        )
        scheme, _, token = (header or "").partition(" ")
        return kopf.ConnectionInfo(
            server=configuration.host,
            ca_path=configuration.ssl_ca_cert,
            insecure=not configuration.verify_ssl,
            scheme=scheme or None,
            token=token or None,
            certificate_path=configuration.cert_file,
            private_key_path=configuration.key_file,
        )

    @kopf.daemon(
        GROUP, VERSION, PLURAL, id="reconcile", registry=registry, cancellation_backoff=10, cancellation_timeout=10
    )
    async def job_daemon(body: kopf.Body, stopped: kopf.DaemonStopped, logger: logging.Logger, **_: Any) -> None:
        await controller.run_job(body, stopped, logger)

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", registry=registry)
    async def job_deleted(body: kopf.Body, **_: Any) -> None:
        try:
            await asyncio.to_thread(controller.cleanup, copy.deepcopy(dict(body)))
        except ApiException as exc:
            controller.metrics.errors.labels(kind="cleanup").inc()
            raise kopf.TemporaryError(f"cleanup of children failed: {exc.reason}", delay=ERROR_RETRY_SECONDS) from exc

    @kopf.on.event(GROUP, VERSION, PLURAL, id="job-changed", registry=registry)
    def job_changed(event: kopf.RawEvent, name: str, namespace: str, meta: kopf.Meta, **_: Any) -> None:
        # Our own status writes also produce events; only spec changes (a new generation) need a pass.
        key = (namespace, name)
        generation = meta.get("generation")
        if event.get("type") in (None, "ADDED", "DELETED") or controller.wakeups.generations.get(key) != generation:
            controller.wakeups.generations[key] = generation
            controller.wakeups.wake(key)

    # Children are created by the daemon itself, which knows what it created: only later changes need a pass.
    @kopf.on.event("ray.io", "v1", "rayjobs", id="rayjob-changed", labels=children, registry=registry)
    def rayjob_changed(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, **_: Any) -> None:
        if event.get("type") in ("MODIFIED", "DELETED"):
            controller.wakeups.wake((namespace, labels[JOB_LABEL]))

    @kopf.on.event("v1", "configmaps", id="report-changed", labels=children, registry=registry)
    def report_changed(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, **_: Any) -> None:
        if event.get("type") in ("MODIFIED", "DELETED"):
            controller.wakeups.wake((namespace, labels[JOB_LABEL]))

    return registry


def replica_priority(identity: str) -> int:
    """A stable per-replica peering priority in 1..1_000_000 from the pod's name."""
    return zlib.crc32(identity.encode()) % 1_000_000 + 1


def kopf_settings(clusterwide: bool) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Watched namespaces are exact names: without scanning, kopf neither lists namespaces (a cluster-scope permission
    # a namespaced operator lacks) nor watches CRDs; the resources are discovered once at startup.
    settings.scanning.disabled = not clusterwide
    # kopf keeps its bookkeeping in annotations: the status belongs to the operator's strict schema alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    # kopf pauses every peer that shares the top priority, so each replica takes a distinct one: the highest is active,
    # the others stand by until its peering record goes stale.
    settings.peering.priority = replica_priority(os.environ.get("POD_NAME") or socket.gethostname())
    # Our own Events say what happened; kopf adds only its warnings and errors.
    settings.posting.level = logging.WARNING
    return settings


async def run_operator(
    settings: Settings, stop_flag: asyncio.Event | None = None, ready_flag: asyncio.Event | None = None
) -> None:
    kube = Kube.connect(settings.kubeconfig, connections=settings.api_workers)
    controller = Controller(settings, kube)
    # Reconcile passes block on API calls in worker threads; the default pool (CPUs + 4) would serialise them.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(settings.api_workers, thread_name_prefix="reconcile")
    )
    if settings.metrics_port:
        controller.metrics.serve(settings.metrics_port)
    try:
        await kopf.operator(
            registry=make_registry(controller),
            settings=kopf_settings(settings.clusterwide),
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            standalone=settings.standalone,
            peering_name=settings.peering,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        kube.close()
