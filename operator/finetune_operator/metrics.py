"""Prometheus metrics of the operator, served on --metrics-port (the chart's Grafana dashboard charts them)."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from finetune_api.status import JobPhase
from finetune_api.version import version


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.build_info = Gauge(
            "finetune_operator_build_info",
            "Always 1; the labels say what runs.",
            ["version", "python", "kopf", "kubernetes_client"],
            registry=self.registry,
        )
        self.build_info.labels(
            version=version(),
            python=platform.python_version(),
            kopf=_installed("kopf"),
            kubernetes_client=_installed("kubernetes"),
        ).set(1)
        self.reconciles = Counter(
            "finetune_operator_reconciles", "FineTuneJob reconcile passes.", ["result"], registry=self.registry
        )
        self.reconcile_seconds = Histogram(
            "finetune_operator_reconcile_duration_seconds",
            "Wall time of one reconcile pass (observe, decide, act, write status).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.errors = Counter(
            "finetune_operator_errors",
            "Errors while reconciling or cleaning up FineTuneJobs.",
            ["kind"],
            registry=self.registry,
        )
        self.stage_attempts = Counter(
            "finetune_operator_stage_attempts",
            "Stage attempts started, by stage type.",
            ["type"],
            registry=self.registry,
        )
        self.events = Counter(
            "finetune_operator_events",
            "Events posted on FineTuneJobs, by reason (stage outcomes: StageSucceeded, RetryingFromCheckpoint, ...).",
            ["type", "reason"],
            registry=self.registry,
        )
        self.jobs = Gauge(
            "finetune_operator_jobs", "FineTuneJobs seen by this operator, by phase.", ["phase"], registry=self.registry
        )
        self._phases: dict[str, str] = {}
        for phase in JobPhase:
            self.jobs.labels(phase=phase.value).set(0)

    def observe_phase(self, uid: str, phase: str | None) -> None:
        """Record a job's phase (None: the job is gone) and refresh the per-phase gauge."""
        previous = self._phases.pop(uid, None)
        if previous is not None:
            self.jobs.labels(phase=previous).dec()
        if phase is not None:
            self._phases[uid] = phase
            self.jobs.labels(phase=phase).inc()

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
