"""The state machine with a runtime: resolved before the first stage starts, recorded in status, fixed from then on."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_api.pipeline import AttemptObservation, ChildState, Observations, Policy, StartAttempt, reconcile
from finetune_api.reasons import Reason

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
POLICY = Policy(retry_base_seconds=10, retry_max_seconds=600, secret_recheck_seconds=15)

JOB_SPEC: dict[str, Any] = {
    "runtimeRef": {"kind": "ClusterFineTuneRuntime", "name": "gpu-small"},
    "stages": [
        {"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/chat.jsonl"}},
        {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
    ],
}


def runtime(workers: int = 2, generation: int = 1, **policy: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ClusterFineTuneRuntime",
        "metadata": {"name": "gpu-small", "uid": "rt-uid", "generation": generation},
        "spec": {
            "queueName": "team-a",
            "defaults": {
                "model": {"source": "s3://models/base"},
                "storage": {"uri": "s3://runs/team-a"},
                "resources": {"workers": workers, "gpusPerWorker": 1, "image": "registry.acme.dev/trainer:1"},
                "training": {"maxSteps": 20},
            },
            "policy": policy,
        },
    }


class Sim:
    def __init__(self, job, spec):
        self.job, self.spec, self.status, self.now = job, spec, None, T0

    def step(self, runtime_obj=None, attempt=None):
        observations = Observations(attempt or AttemptObservation(), runtime=runtime_obj)
        decision = reconcile(self.job, self.spec, self.status, observations, self.now, POLICY)
        self.status = decision.status
        return decision


def starts(decision):
    return [a for a in decision.actions if isinstance(a, StartAttempt)]


@pytest.fixture
def sim(job):
    return Sim(job, copy.deepcopy(JOB_SPEC))


def test_a_missing_runtime_waits_with_a_clear_condition(sim):
    decision = sim.step(runtime_obj=None)
    assert decision.actions == [] and sim.status.phase == "Pending"
    running = sim.status.condition("Running")
    assert running.reason == Reason.RUNTIME_NOT_FOUND
    assert "ClusterFineTuneRuntime 'gpu-small'" in running.message and "spec.runtimeRef" in running.message
    assert decision.requeue_after == 15
    assert [e.reason for e in decision.events] == [Reason.RUNTIME_NOT_FOUND]
    # Once it exists, the job starts.
    assert starts(sim.step(runtime())) and sim.status.phase == "Running"


def test_the_effective_spec_is_recorded_and_the_stage_renders_from_it(sim):
    [start] = starts(sim.step(runtime()))
    config = start.config
    assert config.input_model == "s3://models/base"
    # The runtime's storage is a root: each job writes under <uri>/<namespace>/<job name>/.
    assert config.output_uri == "s3://runs/team-a/ml/demo/sft/model"
    assert (config.resources.workers, config.resources.image) == (2, "registry.acme.dev/trainer:1")
    assert config.training.max_steps == 20
    assert start.spec.resources.workers == 2
    effective = sim.status.effective_spec
    assert effective["model"]["source"] == "s3://models/base" and effective["resources"]["workers"] == 2
    # Every default is written out, so a later operator version with other defaults runs the same job.
    assert effective["backoffLimit"] == 2 and effective["peft"]["method"] == "lora"
    record = sim.status.runtime
    assert (record.kind, record.name, record.uid, record.generation) == (
        "ClusterFineTuneRuntime",
        "gpu-small",
        "rt-uid",
        1,
    )
    assert record.queue_name == "team-a"


def test_editing_or_deleting_the_runtime_never_changes_a_started_job(sim):
    sim.step(runtime(workers=2))
    recorded = copy.deepcopy(sim.status.effective_spec)
    sim.now += timedelta(seconds=30)
    failed = AttemptObservation(ChildState.failed, "worker died", Reason.STAGE_FAILED, finished_at=sim.now)
    sim.step(runtime(workers=6, generation=2), attempt=failed)
    sim.now += timedelta(seconds=30)
    # The runtime is gone by the time the retry starts: the retry still runs what the first attempt ran.
    [retry] = starts(sim.step(None, attempt=failed))
    assert retry.config.attempt == 2 and retry.config.resources.workers == 2
    assert sim.status.effective_spec == recorded and sim.status.runtime.generation == 1


def test_suspend_is_still_read_from_the_job_after_the_start(sim):
    sim.step(runtime())
    sim.spec["suspend"] = True
    sim.step(None, attempt=AttemptObservation(ChildState.running))
    assert sim.status.phase == "Suspended"


def test_a_policy_violation_fails_the_job_naming_the_field(sim):
    sim.spec["resources"] = {"workers": 12}
    decision = sim.step(runtime(maxWorkers=8))
    assert decision.actions == [] and sim.status.phase == "Failed"
    failed = sim.status.condition("Failed")
    assert failed.reason == Reason.POLICY_VIOLATION
    assert failed.message == "spec.resources.workers: 12 is more than the runtime's policy.maxWorkers 8"
    assert sim.status.effective_spec is None


def test_a_runtime_edit_before_the_start_still_applies(sim):
    sim.spec["suspend"] = True
    sim.step(runtime(workers=2))
    assert sim.status.effective_spec["resources"]["workers"] == 2
    sim.spec["suspend"] = False
    [start] = starts(sim.step(runtime(workers=4, generation=2)))
    assert start.config.resources.workers == 4 and sim.status.runtime.generation == 2


def test_a_job_without_a_runtime_needs_model_and_storage(job):
    spec = copy.deepcopy(JOB_SPEC)
    del spec["runtimeRef"]
    decision = reconcile(job, spec, None, Observations(), T0, POLICY)
    assert decision.status.condition("Failed").reason == Reason.INVALID_SPEC
    assert "spec.model: required" in decision.status.condition("Failed").message
