"""Executors run one stage attempt: `kuberay` as a RayJob, `local` as a detached trainer process on this machine.

Both report through the same per-stage ConfigMap with the job's trainer ServiceAccount, and both translate what
they see of an attempt into an `AttemptObservation` for the state machine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from finetune_api.pipeline import AttemptObservation, ChildState, JobRef
from finetune_api.reasons import Reason
from finetune_api.render import (
    STAGE_OUTPUTS,
    StageConfig,
    rayjob_name,
    stage_config_json,
    stage_root,
)
from finetune_api.report import EXIT_PERMANENT_FAILURE
from finetune_api.spec import FineTuneJobSpec, uri_scheme
from finetune_api.status import FineTuneJobStatus
from finetune_api.timeutil import parse_time
from finetune_api.uris import pvc_path
from finetune_operator import children
from finetune_operator.kube import CONFIGMAP, POD, RAYJOB, Kube
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)

# KubeRay labels every pod of a RayCluster with the cluster's name (ray-operator/controllers/ray/utils/constant.go).
RAY_CLUSTER_LABEL = "ray.io/cluster"


class Executor(Protocol):
    # How often a live attempt must be polled because its changes produce no watch events (None: watch is enough).
    poll_seconds: float | None

    def start(
        self, job: JobRef, spec: FineTuneJobSpec, config: StageConfig, active_deadline_seconds: int | None = None
    ) -> Callable[[], None] | None:
        """Start the attempt (idempotent). Returns the rest of the start, which need not precede the attempt's child
        and may run later (None: nothing is left)."""
        ...

    def observe(self, job: JobRef, stage: str, attempt: int) -> AttemptObservation: ...

    def stop(self, job: JobRef, stage: str, attempt: int, suspend: bool) -> None: ...

    def cleanup(self, job: JobRef) -> None: ...

    def forget(self, uid: str) -> None: ...


def rayjob_observation(rayjob: dict[str, Any] | None) -> AttemptObservation:
    """Meaning of a RayJob's status as KubeRay writes it (it has no conditions: jobDeploymentStatus + Ray's jobStatus)."""
    if rayjob is None:
        return AttemptObservation(ChildState.absent)
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or ""
    ray_status = status.get("jobStatus") or ""
    detail = " ".join(part for part in (status.get("reason", ""), status.get("message", "")) if part).strip()
    ended = parse_time(status["endTime"]) if status.get("endTime") else None
    if ray_status == "SUCCEEDED":
        return AttemptObservation(ChildState.succeeded, finished_at=ended)
    labels = (rayjob.get("metadata") or {}).get("labels") or {}
    queue = labels.get(children.KUEUE_QUEUE_LABEL)
    if (rayjob.get("spec") or {}).get("suspend") or deployment in ("Suspending", "Suspended"):
        if queue:
            # Kueue holds it: created suspended by its webhook, or suspended again on eviction/preemption
            # (kueue pkg/controller/jobframework/reconciler.go); it un-suspends the RayJob when it admits the workload.
            return AttemptObservation(ChildState.queued, f"waiting for Kueue to admit it from queue {queue}")
        return AttemptObservation(ChildState.suspended)
    if deployment == "ValidationFailed":
        return AttemptObservation(
            ChildState.failed,
            f"KubeRay rejected the RayJob: {detail}",
            Reason.RAYJOB_VALIDATION_FAILED,
            permanent=True,
            finished_at=ended,
        )
    if deployment in ("Complete", "Failed"):
        # Complete with a non-successful Ray job (FAILED/STOPPED) is a failure too.
        message = f"RayJob {deployment.lower()}, Ray job {ray_status or 'status unknown'}" + (
            f": {detail}" if detail else ""
        )
        return AttemptObservation(ChildState.failed, message, Reason.STAGE_FAILED, finished_at=ended)
    if deployment in ("Initializing", "Waiting", "Retrying"):
        # KubeRay sets startTime when it begins creating the cluster, again after every resume (initRayJobStatusIfNeed
        # in rayjob_controller.go), so time spent suspended or queued is not counted against the start timeout.
        since = parse_time(status["startTime"]) if status.get("startTime") else None
        return AttemptObservation(ChildState.initializing, detail or f"RayJob {deployment}", since=since)
    if deployment == "Running":
        return AttemptObservation(ChildState.running, detail)
    return AttemptObservation(ChildState.starting, "waiting for KubeRay to pick up the RayJob")


# Container waiting reasons that mean a pod will not start by itself.
_STUCK_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}


def pod_problems(pods: list[dict[str, Any]], events: list[dict[str, Any]] = ()) -> list[str]:
    """Why a Ray cluster's pods are not up, in their own words: `<pod>: <reason>: <message>`, one per stuck pod.

    Pod status says it for scheduling and image pulls; a pod stuck creating its containers (FailedMount,
    FailedAttachVolume of a ReadWriteOnce claim already attached elsewhere) says it only in its Warning Events."""
    latest_warning: dict[str, dict[str, Any]] = {}
    for event in sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or ""):
        involved = event.get("involvedObject") or {}
        if event.get("type") == "Warning" and involved.get("kind") == "Pod":
            latest_warning[involved.get("name", "")] = event
    problems = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        found = ""
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                # The scheduler's FailedScheduling event says the same as this condition, e.g. "0/4 nodes are
                # available: 4 Insufficient nvidia.com/gpu".
                found = f"{condition.get('reason') or 'Unschedulable'}: {condition.get('message', '')}".strip(": ")
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _STUCK_WAITING:
                found = f"{waiting['reason']}: {waiting.get('message', '')}".strip(": ")
        if not found and status.get("phase", "Pending") == "Pending" and name in latest_warning:
            event = latest_warning[name]
            found = f"{event.get('reason', '')}: {event.get('message', '')}".strip(": ")
        if found:
            problems.append(f"{name}: {found}"[:300])
    return problems


class _Base:
    poll_seconds: float | None = None

    def __init__(self, kube: Kube, settings: Settings):
        self.kube, self.settings = kube, settings
        # Job uids whose trainer ServiceAccount, and whose Role/RoleBinding, this process has made sure of: the Role
        # names every stage's ConfigMap, so later stages skip those creates.
        self.accounts_ready: set[str] = set()
        self.access_ready: set[str] = set()

    def prepare(self, job: JobRef, config: StageConfig) -> None:
        """What the attempt's pods need to start: the trainer's ServiceAccount and the stage's ConfigMap holding this
        attempt's config (idempotent)."""
        if job.uid not in self.accounts_ready:
            self.kube.create_if_absent(children.trainer_service_account(job))
            self.accounts_ready.add(job.uid)
        manifest = children.stage_configmap(job, config)
        if not self.kube.create_if_absent(manifest):
            # A retry, or this attempt's start repeated after a crash: its config replaces what the ConfigMap holds
            # (the report, which names its attempt, stays until the new attempt writes one).
            self.kube.patch(CONFIGMAP, job.namespace, manifest["metadata"]["name"], {"data": manifest["data"]})

    def grant_report_access(self, job: JobRef, manifests: list[dict[str, Any]]) -> None:
        """The trainer's Role and RoleBinding (`children.trainer_report_access`; idempotent)."""
        if job.uid not in self.access_ready:
            for manifest in manifests:
                self.kube.create_if_absent(manifest)
            self.access_ready.add(job.uid)

    def forget(self, uid: str) -> None:
        """The job is gone."""
        self.accounts_ready.discard(uid)
        self.access_ready.discard(uid)

    def delete_children(self, job: JobRef) -> None:
        selector = children.job_selector(job.name)
        for kind in (RAYJOB, CONFIGMAP):
            for item in self.kube.list(kind, job.namespace, selector):
                self.kube.delete(kind, job.namespace, item["metadata"]["name"])
        name = children.trainer_service_account_name(job.name)
        for kind in (
            ("rbac.authorization.k8s.io/v1", "RoleBinding"),
            ("rbac.authorization.k8s.io/v1", "Role"),
            ("v1", "ServiceAccount"),
        ):
            self.kube.delete(kind, job.namespace, name)


class KubeRayExecutor(_Base):
    """Each attempt is a RayJob; KubeRay's status changes arrive as watch events."""

    def start(
        self, job: JobRef, spec: FineTuneJobSpec, config: StageConfig, active_deadline_seconds: int | None = None
    ) -> Callable[[], None] | None:
        self.prepare(job, config)
        # The trainer's Role and RoleBinding are left for later: the trainer needs them only once it reports, seconds
        # after its pods start, and creating them as the operator takes ~100 ms each. The RBAC escalation check lists
        # the bindings with a consistent read (kube-apiserver pkg/registry/rbac/rest/storage_rbac.go), which the
        # watch cache answers after etcd's next progress notification, requested every 100 ms (k8s.io/apiserver
        # pkg/storage/cacher/progress/watch_progress.go).
        rest = None
        if job.uid not in self.access_ready:
            rest = functools.partial(self.grant_report_access, job, children.trainer_report_access(job, spec))
        manifest = children.rayjob(job, spec, config, self.settings, active_deadline_seconds)
        if self.kube.create_if_absent(manifest):
            return rest
        name = manifest["metadata"]["name"]
        existing = self.kube.get(RAYJOB, job.namespace, name) or {}
        if (existing.get("metadata") or {}).get("deletionTimestamp"):
            # Resuming right after a Kueue suspend deleted it: KubeRay's finalizer still holds the old one. Failing the
            # pass keeps the status as it was, and the next pass creates the RayJob once it is gone.
            raise RuntimeError(f"RayJob {job.namespace}/{name} is still being deleted; it is created again once gone")
        if children.is_kueue_managed(job):
            # Kueue alone decides when a queued RayJob runs: it clears `suspend` on admission.
            return rest
        if (existing.get("spec") or {}).get("suspend"):
            self.kube.patch(RAYJOB, job.namespace, name, {"spec": {"suspend": False}})
        return rest

    def observe(self, job: JobRef, stage: str, attempt: int) -> AttemptObservation:
        rayjob = self.kube.get(RAYJOB, job.namespace, rayjob_name(job.name, stage, attempt))
        observed = rayjob_observation(rayjob)
        cluster = ((rayjob or {}).get("status") or {}).get("rayClusterName")
        if observed.state == ChildState.initializing and cluster:
            pods = self.kube.list(POD, job.namespace, f"{RAY_CLUSTER_LABEL}={cluster}")
            events = self.kube.list_events(job.namespace, "type=Warning,involvedObject.kind=Pod") if pods else []
            problems = pod_problems(pods, events)
            if problems:
                observed = dataclasses.replace(observed, message="; ".join(problems))
        return observed

    def stop(self, job: JobRef, stage: str, attempt: int, suspend: bool) -> None:
        name = rayjob_name(job.name, stage, attempt)
        if suspend and not children.is_kueue_managed(job):
            # KubeRay deletes the Ray cluster of a suspended RayJob and recreates it when unsuspended.
            self.kube.patch(RAYJOB, job.namespace, name, {"spec": {"suspend": True}})
        else:
            # Under Kueue `suspend` is Kueue's: it un-suspends any RayJob whose workload is admitted (reconciler.go,
            # "Job admitted, unsuspending"). Suspending means deleting the RayJob, which releases the quota; on resume
            # the attempt's RayJob is created again and queued again.
            self.kube.delete(RAYJOB, job.namespace, name)

    def cleanup(self, job: JobRef) -> None:
        self.delete_children(job)


class LocalExecutor(_Base):
    """Each attempt is `python -m finetune_trainer.stage ... --no-ray`, detached in its own session.

    Per attempt a directory under the state dir holds `stage.log`, `pid`, `exit_code` (written by a shell wrapper when
    the trainer exits) and the trainer's kubeconfig (a TokenRequest token of the job's trainer ServiceAccount, so the
    trainer has exactly its RBAC). The files outlive the operator, so a restarted operator adopts a running process.
    """

    def __init__(self, kube: Kube, settings: Settings):
        super().__init__(kube, settings)
        self.poll_seconds = settings.local_poll_seconds
        # Processes this operator started, kept to reap them when they exit (adopted ones are reaped by init).
        self.children: dict[int, subprocess.Popen] = {}

    def attempt_dir(self, job: JobRef, stage: str, attempt: int) -> Path:
        # Absolute: the path is also the marker that identifies the attempt's process in /proc.
        return self.settings.state_dir.resolve() / job.namespace / job.name / f"{stage}-{attempt}"

    def _reap(self) -> None:
        for pid, process in list(self.children.items()):
            if process.poll() is not None:
                del self.children[pid]

    def _alive_pid(self, directory: Path) -> int | None:
        """The attempt's process id if it still runs (checked against its command line, so a reused pid is not adopted)."""
        self._reap()
        try:
            pid = int((directory / "pid").read_text())
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return None
        return pid if state != "Z" and str(directory) in cmdline else None

    def start(
        self, job: JobRef, spec: FineTuneJobSpec, config: StageConfig, active_deadline_seconds: int | None = None
    ) -> None:
        self.prepare(job, config)
        # The process may report at once: nothing is left for later.
        self.grant_report_access(job, children.trainer_report_access(job, spec))
        directory = self.attempt_dir(job, config.stage.name, config.attempt)
        if self._alive_pid(directory) is not None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        for stale in ("pid", "exit_code", "suspended"):
            (directory / stale).unlink(missing_ok=True)
        token = self.kube.service_account_token(
            job.namespace, children.trainer_service_account_name(job.name), self.settings.local_token_seconds
        )
        kubeconfig = self.kube.kubeconfig_for_token(token, directory / "kubeconfig", job.namespace)
        # A file, like the RayJob's mounted ConfigMap: one argv word is limited to 128 KiB (MAX_ARG_STRLEN).
        config_file = directory / "config.json"
        config_file.write_text(stage_config_json(config))
        command = children.stage_command(
            config, config_path=str(config_file), python=self.settings.trainer_python, no_ray=True
        )
        # `$0` is the attempt directory: it makes the process recognisable in /proc for adoption.
        wrapper = [
            "/bin/sh",
            "-c",
            '"$@"; code=$?; echo $code > "$0/exit_code.tmp" && mv "$0/exit_code.tmp" "$0/exit_code"; exit $code',
            str(directory),
            *command,
        ]
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        with open(directory / "stage.log", "ab") as output:
            # The operator's working directory, so relative paths in a spec mean what they mean to whoever started it.
            process = subprocess.Popen(
                wrapper,
                cwd=os.getcwd(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children[process.pid] = process
        (directory / "pid").write_text(str(process.pid))
        log.info(
            "started stage %s attempt %d of %s/%s as pid %d (log: %s)",
            config.stage.name,
            config.attempt,
            job.namespace,
            job.name,
            process.pid,
            directory / "stage.log",
        )

    def observe(self, job: JobRef, stage: str, attempt: int) -> AttemptObservation:
        directory = self.attempt_dir(job, stage, attempt)
        exit_file = directory / "exit_code"
        if exit_file.exists():
            code = int(exit_file.read_text().strip() or "1")
            finished = datetime.fromtimestamp(exit_file.stat().st_mtime, UTC)
            if code == 0:
                return AttemptObservation(ChildState.succeeded, finished_at=finished)
            return AttemptObservation(
                ChildState.failed,
                f"trainer exited with code {code}: {_last_line(directory / 'stage.log')}",
                Reason.STAGE_FAILED,
                permanent=code == EXIT_PERMANENT_FAILURE,
                finished_at=finished,
            )
        if self._alive_pid(directory) is not None:
            return AttemptObservation(ChildState.running)
        if (directory / "suspended").exists():
            return AttemptObservation(ChildState.suspended)
        return AttemptObservation(ChildState.absent)

    def _kill(self, directory: Path) -> None:
        """Stop the attempt's whole process group and wait until none of it runs (so a resume never overlaps it)."""
        pid = self._alive_pid(directory)
        if pid is None:
            return
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self._reap()
                if not _group_running(pid):
                    return
                time.sleep(0.1)

    def stop(self, job: JobRef, stage: str, attempt: int, suspend: bool) -> None:
        directory = self.attempt_dir(job, stage, attempt)
        if suspend:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "suspended").touch()
        self._kill(directory)
        (directory / "pid").unlink(missing_ok=True)

    def cleanup(self, job: JobRef) -> None:
        job_dir = self.settings.state_dir.resolve() / job.namespace / job.name
        if job_dir.is_dir():
            for directory in job_dir.iterdir():
                self._kill(directory)
            shutil.rmtree(job_dir, ignore_errors=True)
        self.delete_children(job)


def _group_running(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies left for a reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _last_line(path: Path, limit: int = 300) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(path.stat().st_size - 4096, 0))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return (lines[-1] if lines else "empty log")[:limit]


def delete_artifacts(spec: FineTuneJobSpec, pvc_root: Path, status: FineTuneJobStatus | None = None) -> list[str]:
    """With `storage.retainOnDelete: false`, remove what the job's stages wrote where this process can reach it.

    Only a stage that started an attempt wrote anything, and only `STAGE_OUTPUTS` (checkpoints, model, metrics.jsonl,
    tensorboard): other files under
    `<uri>/<stage>/` are the user's and are kept, and a `pvc://` path never leaves its claim's mount. Returns one line
    per stage for the Event: what was deleted and what is left to the user (s3://, unreachable PVCs).
    """
    started = {s.name for s in status.stages if s.attempts} if status is not None else None
    results = []
    for stage in spec.stages:
        uri = stage_root(spec.storage, stage.name)
        scheme = uri_scheme(uri)
        if scheme == "s3":
            results.append(f"{uri}: kept (objects in S3 are the user's to delete)")
            continue
        if started is not None and stage.name not in started:
            results.append(f"{uri}: never started, nothing to delete")
            continue
        try:
            root = Path(uri.removeprefix("file://")) if scheme == "file" else pvc_path(uri, pvc_root)
        except ValueError as exc:
            results.append(f"{uri}: kept ({exc})")
            continue
        if not root.is_dir():
            results.append(f"{uri}: not reachable from the operator, kept")
            continue
        for written in STAGE_OUTPUTS:
            target = root / written
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        if any(root.iterdir()):
            results.append(f"{uri}: deleted {', '.join(STAGE_OUTPUTS)}; other files kept")
        else:
            root.rmdir()
            results.append(f"{uri}: deleted")
    return results


def make_executor(kube: Kube, settings: Settings) -> KubeRayExecutor | LocalExecutor:
    return LocalExecutor(kube, settings) if settings.executor == "local" else KubeRayExecutor(kube, settings)
