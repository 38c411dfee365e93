"""Prometheus metrics of the operator, served on --metrics-port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from finetune_api.status import JobPhase


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "finetune_operator_reconciles", "FineTuneJob reconcile passes.", ["result"], registry=self.registry
        )
        self.errors = Counter(
            "finetune_operator_errors",
            "Errors while reconciling or cleaning up FineTuneJobs.",
            ["kind"],
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
