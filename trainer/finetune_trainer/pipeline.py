"""`finetune run`: the whole pipeline on this machine, driven by the operator's own state machine.

Each pass observes the current stage's process and report file, asks `finetune_api.pipeline.reconcile` what to do,
does it, and writes the status file: the same decisions, reasons, retries with backoff and status document as the
operator. Every attempt is a `finetune stage` child process (a clean interpreter each time, the operator's entrypoint).
Ctrl-C suspends the pipeline as `spec.suspend` would; running it again resumes from the latest checkpoint.
A stage process's own output goes to its `stage.log` (and to the terminal too with `--verbose`); the terminal shows
the pipeline's progress (`display.py`) and, when an attempt fails, the end of its log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from finetune_api.manifest import ManifestError, load_manifest
from finetune_api.pipeline import (
    AttemptObservation,
    ChildState,
    Decision,
    JobRef,
    Observations,
    Policy,
    StartAttempt,
    StopAttempt,
    attempt_to_observe,
    reconcile,
)
from finetune_api.reasons import PERMANENT, Reason
from finetune_api.render import StageConfig, join_uri, render_stage, stage_root
from finetune_api.report import EXIT_PERMANENT_FAILURE, StageReport
from finetune_api.runtime import with_runtime
from finetune_api.spec import FineTuneJob, FineTuneJobSpec
from finetune_api.status import FINISHED_PHASES, ConditionType, FineTuneJobStatus, JobPhase, StagePhase, StageStatus
from finetune_api.table import print_table
from finetune_trainer import storage
from finetune_trainer.display import make_display, tail

# Exit codes of `finetune run` (docs/trainer.md): a retryable failure is one a re-run may fix (it resumes).
EXIT_SUCCEEDED, EXIT_RETRYABLE, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
# How often a running attempt is looked at when nothing else is due (a child's exit ends the wait at once).
POLL_SECONDS = 1.0
# Lines of a failed attempt's log shown on the terminal.
FAILURE_LOG_LINES = 50


@dataclass
class _Attempt:
    stage: str
    attempt: int
    process: subprocess.Popen


class ProcessExecutor:
    """Runs each attempt as `finetune stage` in a child process; its report goes to a file the loop reads."""

    def __init__(self, job: FineTuneJob, status_path: Path, use_ray: bool, verbose: bool = False):
        self.job, self.status_path, self.use_ray, self.verbose = job, status_path, use_ray, verbose
        self.current: _Attempt | None = None

    def _stage_file(self, stage: str, name: str) -> Path:
        """Beside the stage's outputs, or beside the status file when storage is remote (S3)."""
        if storage.is_remote(self.job.spec.storage.uri):
            return self.status_path.parent / f"{stage}.{name}"
        return storage.local_path(stage_root(self.job.spec.storage, stage)) / name

    def report_path(self, stage: str) -> Path:
        return self._stage_file(stage, "report.json")

    def log_path(self, stage: str) -> Path:
        return self._stage_file(stage, "stage.log")

    def start(self, config: StageConfig) -> None:
        if self.current and (self.current.stage, self.current.attempt) == (config.stage.name, config.attempt):
            return
        report = self.report_path(config.stage.name)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.unlink(missing_ok=True)
        config_file = report.with_name(f"config-{config.attempt}.json")
        config_file.write_text(config.model_dump_json())
        command = [sys.executable, "-m", "finetune_trainer.stage", "--config", str(config_file)]
        command += ["--report", f"file://{report}", *([] if self.use_ray else ["--no-ray"])]
        log = self.log_path(config.stage.name).open("ab")
        log.write(f"==== attempt {config.attempt}: {' '.join(command)}\n".encode())
        log.flush()
        # Its own process group: Ctrl-C reaches the loop alone, which then stops the attempt as a suspend would.
        output = subprocess.PIPE if self.verbose else log
        process = subprocess.Popen(
            command, env=_child_env(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        if self.verbose:
            threading.Thread(target=_tee, args=(process.stdout, log), daemon=True).start()
        else:
            log.close()
        self.current = _Attempt(config.stage.name, config.attempt, process)

    def observe(self, stage: str, attempt: int) -> tuple[AttemptObservation, StageReport | None]:
        try:
            report = StageReport.model_validate_json(self.report_path(stage).read_text())
        except (OSError, ValueError):
            report = None
        current = self.current
        if current is None or (current.stage, current.attempt) != (stage, attempt):
            return AttemptObservation(ChildState.absent), report
        code = current.process.poll()
        if code is None:
            return AttemptObservation(ChildState.running), report
        finished = datetime.now(UTC)
        if code == 0:
            return AttemptObservation(ChildState.succeeded, finished_at=finished), report
        return AttemptObservation(
            ChildState.failed,
            f"the stage process exited with code {code}",
            Reason.STAGE_FAILED,
            permanent=code == EXIT_PERMANENT_FAILURE,
            finished_at=finished,
        ), report

    def stop(self, stage: str, attempt: int) -> None:
        current = self.current
        if current is None or (current.stage, current.attempt) != (stage, attempt):
            return
        if current.process.poll() is None:
            # SIGINT: the trainer saves nothing more and reports Interrupted; the next attempt resumes from a checkpoint.
            os.killpg(current.process.pid, signal.SIGINT)
            try:
                current.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(current.process.pid, signal.SIGKILL)
                current.process.wait()
        self.current = None

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, returning early when the running attempt exits."""
        seconds = max(seconds, 0.0)
        if self.current is None or self.current.process.poll() is not None:
            time.sleep(seconds)
            return
        try:
            self.current.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass


def _tee(source, log) -> None:
    """Copy the child's output to its log and to the terminal (`--verbose`)."""
    with source, log:
        for line in iter(source.readline, b""):
            log.write(line)
            log.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _child_env() -> dict[str, str]:
    """This environment, with the source roots of the running packages first, so the child runs the same code."""
    roots = {
        str(Path(sys.modules[name].__file__).resolve().parents[1]) for name in ("finetune_api", "finetune_trainer")
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*sorted(roots), *filter(None, [env.get("PYTHONPATH")])])
    return env


def default_status_file(job: FineTuneJob) -> Path:
    uri = job.spec.storage.uri
    if storage.is_remote(uri):
        return Path(f"{job.metadata.name}.status.json")
    return storage.local_path(uri) / "status.json"


def _output_complete(spec: FineTuneJobSpec, job_name: str, stage: str) -> bool:
    config = render_stage(job_name, spec, stage)
    return storage.exists(join_uri(config.output_uri, "config.json"), config.storage.endpoint_url)


def _previous_status(path: Path, job: FineTuneJob) -> FineTuneJobStatus | None:
    """An earlier run's status of the same pipeline (same stage names and types), made ready to continue.

    A finished failure is reopened: a re-run is the local retry, so its stages start over from their checkpoints with
    a fresh backoff budget. Stages whose outputs are gone (and every stage after them) run again.
    """
    try:
        status = FineTuneJobStatus.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
    if [(s.name, s.type) for s in status.stages] != [(s.name, s.type) for s in job.spec.stages]:
        return None
    fresh_from = next(
        (
            i
            for i, s in enumerate(status.stages)
            if s.phase != StagePhase.succeeded.value or not _output_complete(job.spec, job.metadata.name, s.name)
        ),
        len(status.stages),
    )
    if fresh_from == len(status.stages) or status.phase not in FINISHED_PHASES:
        return status
    for index in range(fresh_from, len(status.stages)):
        old = status.stages[index]
        status.stages[index] = StageStatus(name=old.name, type=old.type, last_checkpoint=old.last_checkpoint)
    status.phase, status.completion_time = JobPhase.pending.value, None
    status.conditions = [c for c in status.conditions if c.type == ConditionType.suspended.value]
    return status


def _write_status(path: Path, status: FineTuneJobStatus) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(status.to_wire(), indent=2) + "\n")
    partial.replace(path)


class LocalPipeline:
    """observe -> reconcile -> execute, until the job is finished."""

    def __init__(self, job: FineTuneJob, status_path: Path, use_ray: bool, verbose: bool = False):
        self.job, self.status_path = job, status_path
        self.ref = JobRef(name=job.metadata.name, namespace=job.metadata.namespace or "default", uid="local")
        self.spec_raw = job.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
        self.executor = ProcessExecutor(job, status_path, use_ray, verbose)
        self.display = make_display()
        self.failures_shown: set[tuple[str, int]] = set()
        self.policy = Policy(
            retry_base_seconds=float(os.environ.get("FINETUNE_RETRY_BASE_SECONDS", Policy.retry_base_seconds)),
            retry_max_seconds=float(os.environ.get("FINETUNE_RETRY_MAX_SECONDS", Policy.retry_max_seconds)),
        )
        self.status = _previous_status(status_path, job) or FineTuneJobStatus()

    def observe(self) -> Observations:
        self.report: StageReport | None = None
        target = attempt_to_observe(self.job.spec, self.status)
        if target is None:
            return Observations()
        stage, attempt = target
        index = next(i for i, s in enumerate(self.job.spec.stages) if s.name == stage)
        if index >= len(self.status.stages) or not self.status.stages[index].attempts:
            return Observations()
        child, report = self.executor.observe(stage, attempt)
        self.report = report
        if child.state == ChildState.failed and (stage, attempt) not in self.failures_shown:
            self.failures_shown.add((stage, attempt))
            self.show_log_tail(stage, attempt)
        return Observations(attempt=child, report=report)

    def show_log_tail(self, stage: str, attempt: int) -> None:
        log = self.executor.log_path(stage)
        try:
            with log.open(errors="replace") as lines:
                shown = tail(lines, FAILURE_LOG_LINES)
        except OSError:
            shown = []
        width = shutil.get_terminal_size().columns
        print(f"---- {stage} attempt {attempt} failed; the end of {log} ----", file=sys.stderr)
        print("\n".join(line[:width] for line in shown), file=sys.stderr)
        print("----", file=sys.stderr, flush=True)

    def step(self, spec_raw: dict) -> Decision:
        decision = reconcile(self.ref, spec_raw, self.status, self.observe(), datetime.now(UTC), self.policy)
        for action in decision.actions:
            if isinstance(action, StartAttempt):
                self.executor.start(action.config)
            elif isinstance(action, StopAttempt):
                self.executor.stop(action.stage, action.attempt)
        if decision.status.to_wire() != self.status.to_wire():
            _write_status(self.status_path, decision.status)
        self.status = decision.status
        for event in decision.events:
            self.display.event(event.reason, event.message, warning=event.type == "Warning")
        current = self.executor.current
        self.display.update(self.status, current.stage if current else None, self.report if current else None)
        return decision

    def run(self) -> int:
        if self.status.phase == JobPhase.succeeded.value:
            for stage in self.status.stages:
                print(f"[{stage.name}] already succeeded; output {stage.checkpoint}", flush=True)
        try:
            with self.display:
                while True:
                    decision = self.step(self.spec_raw)
                    if self.status.phase in FINISHED_PHASES:
                        break
                    wait = POLL_SECONDS if decision.requeue_after is None else min(decision.requeue_after, POLL_SECONDS)
                    self.executor.wait(wait)
        except KeyboardInterrupt:
            # What `spec.suspend: true` does to a running job: stop the attempt, keep its checkpoints.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.step({**self.spec_raw, "suspend": True})
            print_table(self.status)
            print(f"\nfinetune run: suspended; run it again to resume. status: {self.status_path}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print_table(self.status)
        self.print_worst_predictions()
        print(f"\nstatus: {self.status_path}")
        if not storage.is_remote(self.job.spec.storage.uri):
            from finetune_trainer.report import write_report

            print(f"report: {write_report(storage.local_path(self.job.spec.storage.uri), self.status_path)}")
        return self.exit_code()

    def print_worst_predictions(self, per_task: int = 3) -> None:
        """Error analysis in the run summary: each stage's worst generated answers per task (`predictions.jsonl`)."""
        import json

        from finetune_trainer.metrics import worst_predictions

        if storage.is_remote(self.job.spec.storage.uri):
            return
        for stage in self.status.stages:
            path = storage.local_path(stage_root(self.job.spec.storage, stage.name)) / "predictions.jsonl"
            if not path.is_file():
                continue
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            print(f"\n{stage.name}: worst predictions per task ({path})")
            for task, rows in worst_predictions(records, per_task).items():
                for row in rows:
                    print(
                        f"  [{task}] rougeL {row['rougeL']:.2f} {row['prompt'][-60:]!r} -> {row['output']!r} "
                        f"(reference {row['reference']!r})"
                    )

    def exit_code(self) -> int:
        if self.status.phase == JobPhase.succeeded.value:
            return EXIT_SUCCEEDED
        failed = self.status.condition(ConditionType.failed)
        reason = failed.reason if failed else ""
        print(f"finetune run: failed: {reason}: {failed.message if failed else ''}", file=sys.stderr)
        if reason == Reason.INVALID_SPEC:
            return EXIT_INVALID
        if reason in PERMANENT:
            return EXIT_PERMANENT_FAILURE
        print("re-run to resume from the latest checkpoint", file=sys.stderr)
        return EXIT_RETRYABLE


def run_manifest(
    path: str, status_file: str | None, use_ray: bool, verbose: bool = False, runtime: str | None = None
) -> int:
    try:
        job = with_runtime(load_manifest(path), path, runtime)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    # Every stage's data, the model and the storage are checked before the first stage trains (`finetune validate`).
    from finetune_trainer.validate import preflight

    problems, _ = preflight(job)
    if problems:
        print(f"{path}: {len(problems)} problem(s) found before anything ran:", file=sys.stderr)
        print("\n".join(f"  {problem}" for problem in problems), file=sys.stderr)
        return EXIT_INVALID
    status_path = Path(status_file) if status_file else default_status_file(job)
    return LocalPipeline(job, status_path, use_ray, verbose).run()
