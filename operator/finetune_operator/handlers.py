"""kopf wiring: the registry of handlers, kopf's settings and the operator's main coroutine.

One daemon per FineTuneJob runs the controller's loop; watch events on the job and its children wake it. A finalizer
(kopf's, added because of the daemon and the delete handler) cleans up children when the job is deleted.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from finetune_api.spec import GROUP, PLURAL, VERSION
from finetune_operator.children import JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from finetune_operator.controller import ERROR_RETRY_SECONDS, Controller
from finetune_operator.kube import Kube
from finetune_operator.settings import Settings


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

    # The event handlers are coroutines: they run on the event loop, where asyncio.Event.set() is safe (a plain
    # function would run in kopf's thread pool).
    @kopf.on.event(GROUP, VERSION, PLURAL, id="job-changed", registry=registry)
    async def job_changed(event: kopf.RawEvent, name: str, namespace: str, meta: kopf.Meta, **_: Any) -> None:
        # Our own status writes also produce events; only spec changes (a new generation) need a pass.
        key = (namespace, name)
        generation = meta.get("generation")
        if event.get("type") in (None, "ADDED", "DELETED") or controller.wakeups.generations.get(key) != generation:
            controller.wakeups.generations[key] = generation
            controller.wakeups.wake(key)

    # Children are created by the daemon itself, which knows what it created: only later changes need a pass.
    @kopf.on.event("ray.io", "v1", "rayjobs", id="rayjob-changed", labels=children, registry=registry)
    async def rayjob_changed(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, **_: Any) -> None:
        if event.get("type") in ("MODIFIED", "DELETED"):
            controller.wakeups.wake((namespace, labels[JOB_LABEL]))

    @kopf.on.event("v1", "configmaps", id="report-changed", labels=children, registry=registry)
    async def report_changed(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, **_: Any) -> None:
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
