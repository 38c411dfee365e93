"""kopf wiring: the registry of handlers, kopf's settings and the operator's main coroutine.

Only low-level event handlers: kopf watches the jobs and their children and hands each raw event to the controller,
which queues the job for its workers. No kopf handler tracks progress or a diff base, so kopf writes nothing to the
objects; the controller adds its own finalizer only to jobs whose deletion needs it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from finetune_api.spec import GROUP, PLURAL, VERSION
from finetune_operator.children import JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from finetune_operator.controller import Controller
from finetune_operator.kube import Kube
from finetune_operator.leader import Leadership
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

    # Coroutines: they run on the event loop, where the work queue lives (a plain function would run in a thread).
    @kopf.on.event(GROUP, VERSION, PLURAL, id="job-changed", registry=registry)
    async def job_changed(event: kopf.RawEvent, **_: Any) -> None:
        controller.job_event(event.get("type"), event["object"])

    @kopf.on.event("ray.io", "v1", "rayjobs", id="rayjob-changed", labels=children, registry=registry)
    async def rayjob_changed(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, **_: Any) -> None:
        # Children are created by the pass itself, which knows what it created: only later changes need a pass.
        if event.get("type") in ("MODIFIED", "DELETED"):
            controller.child_event(namespace, labels[JOB_LABEL])

    @kopf.on.event("v1", "configmaps", id="report-changed", labels=children, registry=registry)
    async def report_changed(event: kopf.RawEvent, namespace: str, labels: kopf.Labels, **_: Any) -> None:
        if event.get("type") in ("MODIFIED", "DELETED"):
            controller.child_event(namespace, labels[JOB_LABEL])

    return registry


class NoDiffBase(kopf.DiffBaseStorage):
    """No handler here compares an object with an earlier state of it: kopf's per-event deep copy of every body
    (`DiffBaseStorage.build`, about half of its processing time per event) is skipped, and nothing is stored."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


class NoProgress(kopf.ProgressStorage):
    """Event handlers are not retried by kopf, so there is no progress to keep on the objects."""

    def fetch(self, *, key: Any, body: kopf.Body) -> None:
        return None

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        pass

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        pass

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        pass

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return essence


def kopf_settings(clusterwide: bool) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Watched namespaces are exact names: without scanning, kopf neither lists namespaces (a cluster-scope permission
    # a namespaced operator lacks) nor watches CRDs; the resources are discovered once at startup.
    settings.scanning.disabled = not clusterwide
    settings.persistence.progress_storage = NoProgress()
    settings.persistence.diffbase_storage = NoDiffBase()
    # The API server filters the children's watches: only our stage ConfigMaps and RayJobs reach the operator, not
    # every ConfigMap in the cluster.
    ours = f"{MANAGED_BY_LABEL}={MANAGED_BY},{JOB_LABEL}"
    settings.watching.label_selectors["ray.io", "rayjobs"] = ours
    settings.watching.label_selectors["v1", "configmaps"] = ours
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
    # A standby runs nothing until it holds the lease.
    leadership = await Leadership.begin(kube.configuration, settings)
    workers = asyncio.create_task(controller.run_workers(settings.api_workers), name="reconcile workers")
    registry = make_registry(controller)

    # kopf waits (5 s) on shutdown for tasks it did not start: the workers stop in its cleanup phase instead.
    @kopf.on.cleanup(id="stop-workers", registry=registry)
    async def stop_workers(**_: Any) -> None:
        workers.cancel()
        await asyncio.gather(workers, return_exceptions=True)

    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings(settings.clusterwide),
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            # Replicas take turns through the lease (leader.py), not through kopf's peering.
            standalone=True,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        workers.cancel()
        await asyncio.gather(workers, return_exceptions=True)
        kube.close()
        # Last: the lease guards all of the above. Raises LeadershipError when the lease was lost.
        await leadership.end()
