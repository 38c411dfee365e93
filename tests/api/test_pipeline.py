"""The controller's pure state machine: chaining, retries, permanent failures, suspend, deadline, TTL, conditions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from finetune_api.pipeline import (
    AttemptObservation,
    ChildState,
    DeleteJob,
    Observations,
    Policy,
    StartAttempt,
    StopAttempt,
    reconcile,
)
from finetune_api.reasons import Reason
from finetune_api.render import rayjob_name
from finetune_api.report import StageReport

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
POLICY = Policy(retry_base_seconds=10, retry_max_seconds=600, secret_recheck_seconds=15)
RUNNING = AttemptObservation(ChildState.running)


class Sim:
    """Feeds observations to `reconcile` the way the handler does, carrying status and clock between passes."""

    def __init__(self, job, spec):
        self.job, self.spec = job, spec
        self.status = None
        self.now = T0

    def step(self, attempt=None, report=None, missing=()):
        observations = Observations(attempt or AttemptObservation(), report, tuple(missing))
        decision = reconcile(self.job, self.spec, self.status, observations, self.now, POLICY)
        self.status = decision.status
        return decision

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def stage(self, name):
        return self.status.stage(name)

    def condition(self, type_):
        return self.status.condition(type_)


def starts(decision):
    return [a.config for a in decision.actions if isinstance(a, StartAttempt)]


def reasons_of(decision):
    return [e.reason for e in decision.events]


def failed(at: datetime | None = None, message: str = "worker died", permanent: bool = False):
    return AttemptObservation(ChildState.failed, message, Reason.STAGE_FAILED, permanent=permanent, finished_at=at)


def succeeded_report(attempt: int, checkpoint: str, **metrics: float) -> StageReport:
    return StageReport(
        phase="Succeeded", attempt=attempt, step=20, total_steps=20, checkpoint=checkpoint, metrics=metrics
    )


@pytest.fixture
def sim(job, sample_spec):
    return Sim(job, sample_spec())


def test_first_pass_starts_the_first_stage(sim):
    decision = sim.step()
    [config] = starts(decision)
    assert (config.stage.name, config.attempt, config.input_model) == ("sft", 1, "s3://models/base")
    status = sim.status
    assert (status.phase, status.current_stage, status.progress, status.observed_generation) == (
        "Running",
        "sft",
        "0/3",
        3,
    )
    assert [(s.name, s.phase, s.attempts) for s in status.stages] == [
        ("sft", "Running", 1),
        ("reward", "Pending", 0),
        ("dpo", "Pending", 0),
    ]
    assert sim.stage("sft").ray_job == rayjob_name("demo", "sft", 1)
    assert status.start_time == "2026-03-01T12:00:00Z"
    running = sim.condition("Running")
    assert (running.status, running.reason) == ("True", Reason.STAGE_STARTING)
    assert reasons_of(decision) == [Reason.STAGE_STARTING]


def test_a_restart_adopts_the_live_child(sim):
    sim.step()
    assert sim.step(RUNNING).actions == []
    assert sim.stage("sft").attempts == 1


def test_a_child_that_disappears_after_it_started_is_a_failed_attempt(sim):
    # The status records an attempt only once its child was created, so a missing one was removed: it is retried as a
    # new attempt with backoff, never re-created under the old attempt's name (which would reuse a failed RayJob).
    sim.step()
    sim.step(RUNNING)
    lost = sim.step(AttemptObservation(ChildState.absent))
    assert starts(lost) == [] and lost.requeue_after == 10
    stage = sim.stage("sft")
    assert stage.retry_at == "2026-03-01T12:00:10Z"
    assert f"{rayjob_name('demo', 'sft', 1)} disappeared" in stage.message and Reason.ATTEMPT_LOST in stage.message
    # The wait holds whatever the failed attempt's child looks like meanwhile.
    sim.advance(5)
    assert sim.step(AttemptObservation(ChildState.absent)).actions == []
    sim.advance(5)
    [config] = starts(sim.step(AttemptObservation(ChildState.absent)))
    assert config.attempt == 2 and sim.stage("sft").retry_at is None


def test_cluster_initializing_surfaces_kuberays_message(sim):
    sim.step()
    sim.step(AttemptObservation(ChildState.initializing, "ErrImagePull: trainer:9.9 not found"))
    running = sim.condition("Running")
    assert running.reason == Reason.CLUSTER_INITIALIZING
    assert "ErrImagePull: trainer:9.9 not found" in running.message
    assert sim.stage("sft").phase == "Running"


def test_report_is_mirrored_and_each_checkpoint_announced_once(sim):
    sim.step()
    report = StageReport(
        phase="Running",
        attempt=1,
        step=5,
        total_steps=20,
        epoch=0.5,
        eta_seconds=30,
        loss=1.25,
        metrics={"eval_loss_before": 2.5},
        last_checkpoint="s3://runs/demo/sft/checkpoints/checkpoint-5",
    )
    decision = sim.step(RUNNING, report)
    stage = sim.stage("sft")
    assert (stage.progress.step, stage.progress.total_steps, stage.progress.epoch, stage.progress.eta_seconds) == (
        5,
        20,
        0.5,
        30,
    )
    assert stage.metrics == {"eval_loss_before": 2.5, "loss": 1.25}
    assert stage.last_checkpoint == "s3://runs/demo/sft/checkpoints/checkpoint-5"
    assert reasons_of(decision) == [Reason.CHECKPOINT_SAVED]
    assert sim.condition("Running").reason == Reason.STAGE_RUNNING and "step 5/20" in sim.condition("Running").message
    assert sim.step(RUNNING, report).events == []


def test_success_chains_into_the_next_stage_from_the_previous_output(sim):
    sim.step()
    decision = sim.step(RUNNING, succeeded_report(1, "s3://runs/demo/sft/model", eval_loss_after=0.5))
    sft = sim.stage("sft")
    assert (sft.phase, sft.checkpoint, sft.metrics["eval_loss_after"]) == ("Succeeded", "s3://runs/demo/sft/model", 0.5)
    assert sft.completion_time is not None
    [config] = starts(decision)
    assert (config.stage.name, config.attempt, config.input_model) == ("reward", 1, "s3://runs/demo/sft/model")
    assert (sim.status.current_stage, sim.status.progress) == ("reward", "1/3")
    assert reasons_of(decision) == [Reason.STAGE_SUCCEEDED, Reason.STAGE_STARTING]


def test_a_rayjob_that_succeeded_without_a_report_uses_the_rendered_output(sim):
    sim.step()
    sim.step(AttemptObservation(ChildState.succeeded))
    assert sim.stage("sft").checkpoint == "s3://runs/demo/sft/model"


def _run_to_success(sim):
    sim.step()
    for name in ("sft", "reward", "dpo"):
        sim.advance(60)
        sim.step(RUNNING, succeeded_report(1, f"s3://runs/demo/{name}/model"))
    return sim


def test_all_stages_succeeded_and_a_finished_job_never_reruns(sim):
    _run_to_success(sim)
    status = sim.status
    assert (status.phase, status.progress, status.current_stage) == ("Succeeded", "3/3", None)
    assert status.completion_time == "2026-03-01T12:03:00Z"
    succeeded, running = sim.condition("Succeeded"), sim.condition("Running")
    assert (succeeded.status, succeeded.reason) == ("True", Reason.ALL_STAGES_SUCCEEDED)
    assert "s3://runs/demo/dpo/model" in succeeded.message
    assert (running.status, running.reason) == ("False", Reason.ALL_STAGES_SUCCEEDED)
    # Children gone (e.g. cleaned up by someone): still nothing to do.
    sim.advance(3600)
    decision = sim.step(AttemptObservation(ChildState.absent))
    assert decision.actions == [] and decision.events == []


def test_failures_retry_with_growing_backoff_from_the_checkpoint_then_fail(sim):
    sim.step()
    sim.step(
        RUNNING, StageReport(phase="Running", attempt=1, last_checkpoint="s3://runs/demo/sft/checkpoints/checkpoint-10")
    )
    delays = []
    for attempt in (1, 2):
        decision = sim.step(failed(at=sim.now))
        assert starts(decision) == []
        running = sim.condition("Running")
        assert (running.status, running.reason) == ("True", Reason.RETRYING_FROM_CHECKPOINT)
        assert "checkpoint-10" in running.message
        delays.append(decision.requeue_after)
        sim.advance(decision.requeue_after - 1)
        assert starts(sim.step(failed(at=sim.now - timedelta(seconds=decision.requeue_after - 1)))) == []
        sim.advance(1)
        [config] = starts(sim.step(failed(at=sim.now - timedelta(seconds=decision.requeue_after))))
        assert config.attempt == attempt + 1
        assert sim.stage("sft").ray_job == rayjob_name("demo", "sft", attempt + 1)
        sim.step(RUNNING)
    assert delays == [10, 20]
    decision = sim.step(failed(at=sim.now, message="OOMKilled"))
    assert starts(decision) == []
    assert sim.status.phase == "Failed" and sim.stage("sft").phase == "Failed"
    condition = sim.condition("Failed")
    assert (condition.status, condition.reason) == ("True", Reason.BACKOFF_LIMIT_EXCEEDED)
    assert "OOMKilled" in condition.message and "backoffLimit=2" in condition.message
    assert sim.status.current_stage == "sft"


def test_backoff_is_capped(job, sample_spec):
    policy = Policy(retry_base_seconds=10, retry_max_seconds=30)
    assert [policy.retry_delay(n) for n in (1, 2, 3, 4)] == [10, 20, 30, 30]


def test_a_permanent_reason_from_the_trainer_fails_at_once(sim):
    sim.step()
    report = StageReport(phase="Failed", attempt=1, reason="QualityGateFailed", message="reward accuracy 0.41 < 0.6")
    decision = sim.step(RUNNING, report)
    assert starts(decision) == []
    condition = sim.condition("Failed")
    assert (condition.reason, sim.status.phase) == ("QualityGateFailed", "Failed")
    assert "reward accuracy 0.41 < 0.6" in condition.message


def test_exit_code_three_fails_at_once(sim):
    sim.step()
    decision = sim.step(failed(at=sim.now, message="trainer exited with code 3", permanent=True))
    assert starts(decision) == [] and sim.status.phase == "Failed"
    assert sim.condition("Failed").reason == Reason.STAGE_FAILED


def test_a_stale_report_of_an_earlier_attempt_decides_nothing(sim):
    sim.step()
    sim.step(failed(at=sim.now))
    sim.advance(10)
    sim.step(failed(at=sim.now - timedelta(seconds=10)))
    stale = StageReport(phase="Failed", attempt=1, reason="InvalidDataset", message="old")
    assert sim.step(RUNNING, stale).actions == []
    assert sim.status.phase == "Running"


def test_suspend_stops_the_attempt_and_resume_continues_the_same_attempt(sim):
    sim.step()
    sim.step(
        RUNNING, StageReport(phase="Running", attempt=1, last_checkpoint="s3://runs/demo/sft/checkpoints/checkpoint-10")
    )
    sim.spec["suspend"] = True
    sim.advance(30)
    decision = sim.step(RUNNING)
    assert decision.actions == [StopAttempt("sft", 1, suspend=True)]
    assert (sim.status.phase, sim.stage("sft").phase) == ("Suspended", "Suspended")
    suspended = sim.condition("Suspended")
    assert (suspended.status, suspended.reason, suspended.last_transition_time) == (
        "True",
        Reason.SUSPENDED,
        "2026-03-01T12:00:30Z",
    )
    assert "checkpoint-10" in suspended.message
    assert sim.condition("Running").status == "False"
    assert sim.step(AttemptObservation(ChildState.suspended)).actions == []

    sim.spec["suspend"] = False
    sim.advance(100)
    decision = sim.step(AttemptObservation(ChildState.suspended))
    [config] = starts(decision)
    assert config.attempt == 1
    assert sim.condition("Suspended").status == "False" and sim.condition("Suspended").reason == Reason.RESUMED
    assert sim.status.phase == "Running"
    assert sim.status.suspended_seconds == 100
    assert Reason.RESUMED in reasons_of(decision)


def test_a_job_created_suspended_starts_nothing_until_resumed(job, sample_spec):
    sim = Sim(job, sample_spec(suspend=True))
    decision = sim.step()
    assert decision.actions == []
    assert (sim.status.phase, sim.status.start_time) == ("Suspended", None)
    sim.spec["suspend"] = False
    sim.advance(500)
    assert [c.attempt for c in starts(sim.step())] == [1]
    # Time suspended before the first start does not count against a deadline.
    assert sim.status.suspended_seconds == 0


def test_deadline_excludes_suspended_time(job, sample_spec):
    sim = Sim(job, sample_spec(activeDeadlineSeconds=100))
    sim.step()
    sim.advance(50)
    assert sim.step(RUNNING).requeue_after == 50
    sim.spec["suspend"] = True
    sim.step(RUNNING)
    sim.advance(1000)
    assert sim.step(AttemptObservation(ChildState.suspended)).requeue_after is None
    sim.spec["suspend"] = False
    sim.step(AttemptObservation(ChildState.suspended))
    sim.advance(40)
    decision = sim.step(RUNNING)
    assert sim.status.phase == "Running" and decision.requeue_after == 10
    sim.advance(10)
    decision = sim.step(RUNNING)
    assert decision.actions == [StopAttempt("sft", 1, suspend=False)]
    condition = sim.condition("Failed")
    assert (condition.reason, sim.status.phase) == (Reason.DEADLINE_EXCEEDED, "Failed")
    assert "activeDeadlineSeconds=100" in condition.message


def test_ttl_counts_from_the_finishing_condition_across_restarts(job, sample_spec):
    sim = _run_to_success(Sim(job, sample_spec(ttlSecondsAfterFinished=30)))
    finished_at = sim.now
    assert sim.step().requeue_after == 30
    sim.advance(20)
    # A restarted operator knows only the stored status: the remaining time still comes from lastTransitionTime.
    restarted = reconcile(job, sim.spec, sim.status.to_wire(), Observations(), sim.now, POLICY)
    assert restarted.requeue_after == 10 and restarted.actions == []
    sim.now = finished_at + timedelta(seconds=30)
    assert sim.step().actions == [DeleteJob()]


def test_lasttransitiontime_moves_only_when_the_status_changes(sim):
    sim.step()
    first = sim.condition("Running").last_transition_time
    sim.advance(5)
    sim.step(AttemptObservation(ChildState.initializing, "pulling"))
    sim.advance(5)
    sim.step(RUNNING)
    running = sim.condition("Running")
    assert running.reason == Reason.STAGE_RUNNING and running.last_transition_time == first
    sim.advance(5)
    sim.step(RUNNING, StageReport(phase="Failed", attempt=1, reason="InvalidDataset", message="bad row"))
    assert sim.condition("Running").last_transition_time == "2026-03-01T12:00:15Z"
    assert sim.condition("Failed").last_transition_time == "2026-03-01T12:00:15Z"


def test_missing_secret_waits_names_the_field_and_rechecks(sim):
    missing = [("spec.model.credentialsSecret", "model-creds")]
    decision = sim.step(missing=missing)
    assert decision.actions == [] and decision.requeue_after == 15
    running = sim.condition("Running")
    assert (running.status, running.reason) == ("False", Reason.SECRET_NOT_FOUND)
    assert "spec.model.credentialsSecret" in running.message and "'model-creds'" in running.message
    assert sim.status.phase == "Pending"
    assert reasons_of(decision) == [Reason.SECRET_NOT_FOUND]
    assert sim.step(missing=missing).events == []
    assert [c.attempt for c in starts(sim.step())] == [1]


def test_a_later_stages_missing_secret_blocks_that_stage_only_even_when_it_starts_in_the_same_pass(sim):
    missing = [("spec.stages[1].dataset.credentialsSecret", "prefs-creds")]
    assert [c.stage.name for c in starts(sim.step(missing=missing))] == ["sft"]
    done = succeeded_report(1, "s3://runs/demo/sft/model")
    decision = sim.step(AttemptObservation(ChildState.succeeded), done, missing=missing)
    assert starts(decision) == []
    running = sim.condition("Running")
    assert (running.status, running.reason) == ("False", Reason.SECRET_NOT_FOUND)
    assert "before starting stage reward: spec.stages[1].dataset.credentialsSecret: Secret 'prefs-creds'" in (
        running.message
    )
    assert [c.stage.name for c in starts(sim.step())] == ["reward"]


def test_an_invalid_spec_fails_with_the_field_path(sim):
    sim.spec["model"]["source"] = "ftp://models/base"
    decision = sim.step()
    assert decision.actions == []
    condition = sim.condition("Failed")
    assert (condition.status, condition.reason, sim.status.phase) == ("True", Reason.INVALID_SPEC, "Failed")
    assert condition.message.startswith("spec.model.source: unsupported scheme: expected hf://, s3://, pvc://")


def test_cross_field_errors_keep_their_path(sim):
    sim.spec["stages"][2] = {
        "name": "ppo",
        "type": "ppo",
        "rewardFrom": "nope",
        "dataset": {"uri": "s3://data/p.jsonl"},
    }
    sim.step()
    assert sim.condition("Failed").message.startswith("spec.stages[2].rewardFrom: 'nope' is not an earlier stage")


def test_the_stage_list_cannot_change_after_the_start(sim):
    sim.step()
    sim.spec["stages"] = sim.spec["stages"][:2]
    sim.step(RUNNING)
    condition = sim.condition("Failed")
    assert condition.reason == Reason.INVALID_SPEC and condition.message.startswith("spec.stages:")


def test_inputs_are_not_modified(job, sample_spec):
    status = Sim(job, sample_spec())
    status.step()
    before = status.status.model_copy(deep=True)
    reconcile(job, status.spec, status.status, Observations(RUNNING, succeeded_report(1, "x")), T0, POLICY)
    assert status.status == before


def kstatus(sim) -> dict[str, tuple[str, str]]:
    return {t: (sim.condition(t).status, sim.condition(t).reason) for t in ("Ready", "Reconciling", "Stalled")}


def test_kstatus_conditions_follow_the_phase(job, sample_spec):
    """What Flux's and Argo CD's kstatus reading needs: Reconciling while work is under way, Ready at the end,
    Stalled on failure, none of them true while suspended."""
    running = Sim(job, sample_spec())
    running.step()
    assert kstatus(running) == {
        "Ready": ("False", Reason.STAGE_STARTING),
        "Reconciling": ("True", Reason.STAGE_STARTING),
        "Stalled": ("False", Reason.STAGE_STARTING),
    }
    running.step(RUNNING)
    assert kstatus(running)["Reconciling"] == ("True", Reason.STAGE_RUNNING)
    running.spec["suspend"] = True
    running.step(RUNNING)
    assert {t: s for t, (s, _) in kstatus(running).items()} == {
        "Ready": "False",
        "Reconciling": "False",
        "Stalled": "False",
    }

    done = _run_to_success(Sim(job, sample_spec()))
    assert kstatus(done) == {
        "Ready": ("True", Reason.ALL_STAGES_SUCCEEDED),
        "Reconciling": ("False", Reason.ALL_STAGES_SUCCEEDED),
        "Stalled": ("False", Reason.ALL_STAGES_SUCCEEDED),
    }
    assert done.condition("Ready").observed_generation == job.generation

    broken = Sim(job, sample_spec())
    broken.step()
    broken.step(RUNNING, StageReport(phase="Failed", attempt=1, reason="QualityGateFailed", message="too low"))
    assert kstatus(broken) == {
        "Ready": ("False", "QualityGateFailed"),
        "Reconciling": ("False", "QualityGateFailed"),
        "Stalled": ("True", "QualityGateFailed"),
    }
    assert "too low" in broken.condition("Stalled").message


def test_waiting_for_a_retry_changes_nothing_from_pass_to_pass(sim):
    """A backoff's message names when the next attempt starts, not how long is left: no status write while waiting."""
    sim.step()
    sim.step(failed(at=T0))
    waiting = sim.status.to_wire()
    assert "resumes from the stage's start (no checkpoint yet) at 2026-03-01T12:00:10Z" in sim.stage("sft").message
    sim.advance(5)
    decision = sim.step(failed(at=T0))
    assert decision.status.to_wire() == waiting and decision.events == [] and decision.actions == []


# -- Kueue, start timeout, deadline ---------------------------------------------------------------------------------------

QUEUED = AttemptObservation(ChildState.queued, "waiting for Kueue to admit it from queue team-a")


def test_a_rayjob_held_by_kueue_shows_as_queued_and_is_left_alone(sim):
    sim.step()
    decision = sim.step(QUEUED)
    assert decision.actions == []
    assert (sim.status.phase, sim.stage("sft").phase) == ("Running", "Queued")
    running = sim.condition("Running")
    assert (running.status, running.reason) == ("True", Reason.QUEUED)
    assert "queue team-a" in running.message
    # Hours in the queue are not a start timeout.
    sim.advance(6 * 3600)
    assert sim.step(QUEUED).actions == [] and sim.stage("sft").phase == "Queued"
    sim.step(RUNNING)
    assert (sim.stage("sft").phase, sim.condition("Running").reason) == ("Running", Reason.STAGE_RUNNING)


def test_suspending_a_queued_attempt_stops_it_and_resume_starts_the_same_attempt(sim):
    sim.step()
    sim.step(QUEUED)
    sim.spec["suspend"] = True
    decision = sim.step(QUEUED)
    assert decision.actions == [StopAttempt("sft", 1, suspend=True)]
    assert sim.stage("sft").phase == "Suspended"
    # Under Kueue the executor deletes the RayJob to suspend it; an absent child of a suspended stage is no failure.
    assert sim.step(AttemptObservation(ChildState.absent)).actions == []
    sim.spec["suspend"] = False
    [config] = starts(sim.step(AttemptObservation(ChildState.absent)))
    assert config.attempt == 1 and sim.stage("sft").attempts == 1


def test_an_attempt_stuck_initializing_fails_at_the_start_timeout_with_the_pods_reasons(job, sample_spec):
    sim = Sim(job, sample_spec())
    policy = Policy(retry_base_seconds=10, retry_max_seconds=600, start_timeout_seconds=600)

    def step(observation):
        decision = reconcile(sim.job, sim.spec, sim.status, Observations(observation), sim.now, policy)
        sim.status = decision.status
        return decision

    step(AttemptObservation())
    stuck = "demo-sft-1-x-head: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu"
    since = sim.now
    sim.advance(300)
    waiting = step(AttemptObservation(ChildState.initializing, stuck, since=since))
    assert waiting.actions == [] and waiting.requeue_after == 300
    sim.advance(300)
    decision = step(AttemptObservation(ChildState.initializing, stuck, since=since))
    assert decision.actions == [StopAttempt("sft", 1, suspend=False)]
    message = sim.stage("sft").message
    assert Reason.START_TIMEOUT in message and "Insufficient nvidia.com/gpu" in message
    assert sim.condition("Running").reason == Reason.RETRYING_FROM_CHECKPOINT
    # The deleted child does not turn the known failure into another one; the retry comes after the backoff.
    sim.advance(10)
    [config] = starts(step(AttemptObservation(ChildState.absent)))
    assert config.attempt == 2


def test_the_childs_deadline_is_what_is_left_of_the_jobs(sim):
    sim.spec["activeDeadlineSeconds"] = 3600
    [first] = [a for a in sim.step().actions if isinstance(a, StartAttempt)]
    assert first.active_deadline_seconds == 3600
    sim.advance(1000)
    sim.step(failed(at=sim.now))
    sim.advance(10)
    [retry] = [a for a in sim.step(failed(at=sim.now - timedelta(seconds=10))).actions if isinstance(a, StartAttempt)]
    assert (retry.config.attempt, retry.active_deadline_seconds) == (2, 2590)


def test_local_paths_are_refused_where_the_trainer_runs_in_pods(job, sample_spec):
    spec = sample_spec(storage={"uri": "file:///data/runs"})
    spec["stages"][0]["dataset"] = {"uri": "./instruct.jsonl"}
    kuberay = Policy(local_paths_allowed=False)
    decision = reconcile(job, spec, None, Observations(), T0, kuberay)
    assert decision.actions == [] and decision.status.phase == "Failed"
    failed = decision.status.condition("Failed")
    assert failed.reason == Reason.INVALID_SPEC
    assert "spec.storage.uri: 'file:///data/runs'" in failed.message
    assert "spec.stages[0].dataset.uri: './instruct.jsonl'" in failed.message and "pvc://" in failed.message
    # The local executor (and `finetune run`) run the trainer where those paths are.
    assert starts(reconcile(job, spec, None, Observations(), T0, Policy()))


def test_a_claim_that_cannot_span_nodes_is_announced_when_an_attempt_starts(job, sample_spec):
    warning = "pvc://data: PersistentVolumeClaim 'data' is ReadWriteOnce; ... use a ReadWriteMany claim (or s3://)"
    decision = reconcile(job, sample_spec(), None, Observations(storage_warnings=(warning,)), T0)
    assert starts(decision)
    [event] = [e for e in decision.events if e.reason == Reason.STORAGE_NOT_SHARED]
    assert event.type == "Warning" and event.message == f"stage sft: {warning}"
