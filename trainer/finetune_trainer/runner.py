"""Run stages: one stage (`run_stage`, used by the entrypoint) and a whole manifest locally (`run_pipeline`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from finetune_api.manifest import ManifestError, load_manifest
from finetune_api.render import StageConfig, join_uri, render_stage, stage_root
from finetune_api.report import EXIT_PERMANENT_FAILURE, StageReport
from finetune_api.spec import FineTuneJob
from finetune_api.status import ConditionType, FineTuneJobStatus, JobPhase, StagePhase, StageStatus, now_rfc3339
from finetune_trainer import storage, strategy
from finetune_trainer.errors import StageError
from finetune_trainer.recipes import RECIPES
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.reporting import ReportChannel, Reporter, format_duration


def uses_ray(config: StageConfig, use_ray: bool) -> bool:
    """Ray Train runs a stage with several workers, or any stage when a Ray cluster is configured (RAY_ADDRESS).

    A single worker on the local machine trains in-process: same code, without Ray's start-up cost.
    """
    return use_ray and (config.resources.workers > 1 or bool(os.environ.get("RAY_ADDRESS")))


def _quiet_libraries() -> None:
    """Our progress lines replace the libraries' per-step bars, which flood pod logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def execute_stage(
    config: StageConfig, reporter: Reporter | None, rank: int, world_size: int, local_rank: int, work_dir: Path
) -> tuple[dict[str, float], StageReport]:
    """Run the stage's recipe in this process (the whole stage, or one Ray worker's share)."""
    _quiet_libraries()
    context = StageContext(config, reporter, rank=rank, world_size=world_size, work_dir=work_dir, local_rank=local_rank)
    metrics = RECIPES[config.stage.type].run(context)
    return {key: float(value) for key, value in metrics.items()}, context.channel.report


def find_stage_error(error: BaseException | None) -> StageError | None:
    """The StageError behind `error`, looking through Ray's wrappers (worker failures, task errors, causes)."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StageError):
            return current
        pending.extend(getattr(current, "worker_failures", {}).values())
        pending.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None


def _work_dir(config: StageConfig) -> Path:
    root = Path(os.environ.get("FINETUNE_WORK_DIR", Path(tempfile.gettempdir()) / "finetune-work"))
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{config.job_name}-{config.stage.name}-{config.attempt}-", dir=root))


def run_stage(config: StageConfig, reporter: Reporter | None, use_ray: bool) -> dict[str, float]:
    """Run one stage attempt to its final report. Raises StageError (or the unexpected error) on failure."""
    channel = ReportChannel(reporter, config.attempt)
    on_ray = uses_ray(config, use_ray)
    channel.started(f"attempt {config.attempt}: {config.resources.workers} worker(s){' on Ray' if on_ray else ''}")
    work_dir = _work_dir(config)
    try:
        RECIPES[config.stage.type]  # a missing recipe fails here, before any worker starts
        if on_ray:
            from finetune_trainer.ray_launcher import run_on_ray

            metrics, report = run_on_ray(config, reporter, work_dir)
        else:
            if config.deepspeed.zero_stage > 0:
                strategy.single_process_env()  # DeepSpeed wants a (one-process) process group
            metrics, report = execute_stage(config, reporter, rank=0, world_size=1, local_rank=0, work_dir=work_dir)
    except BaseException as exc:
        error = find_stage_error(exc)
        if error is not None:
            channel.failed(error.reason, str(error))
            raise error from None
        if isinstance(exc, KeyboardInterrupt):
            channel.failed("Interrupted", "interrupted; a new attempt resumes from the latest checkpoint")
        else:
            traceback.print_exc()
            channel.failed("TrainingFailed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    channel.report = report
    channel.succeeded(metrics, config.output_uri)
    return metrics


# ---- `finetune run`: the whole pipeline on this machine ------------------------------------------------------------

# Shown first in the summary table when present; other metrics fill the remaining columns alphabetically.
_TABLE_METRICS = (
    "eval_loss_before",
    "eval_loss_after",
    "perplexity_after",
    "rougeL",
    "bleu",
    "eval_accuracy",
    "eval_margin",
    "eval_reward_accuracy",
    "eval_reward_margin",
    "reward_mean_first",
    "reward_mean_last",
    "kl_mean",
)
_TABLE_METRIC_COUNT = 5


def default_status_file(job: FineTuneJob) -> Path:
    uri = job.spec.storage.uri
    if storage.is_remote(uri):
        return Path(f"{job.metadata.name}.status.json")
    return storage.local_path(uri) / "status.json"


def _report_path(job: FineTuneJob, stage_name: str, status_path: Path) -> Path:
    """Where the stage child writes its StageReport: beside the stage's outputs, or beside the status file for S3."""
    if storage.is_remote(job.spec.storage.uri):
        return status_path.parent / f"{stage_name}.report.json"
    return storage.local_path(stage_root(job.spec.storage, stage_name)) / "report.json"


def _output_complete(config: StageConfig) -> bool:
    return storage.exists(join_uri(config.output_uri, "config.json"), config.storage.endpoint_url)


def _previous_status(path: Path, job: FineTuneJob) -> FineTuneJobStatus | None:
    """The status of an earlier run of the same pipeline (same stage names and types), if any."""
    try:
        status = FineTuneJobStatus.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
    if [(s.name, s.type) for s in status.stages] != [(s.name, s.type) for s in job.spec.stages]:
        return None
    return status


def _write_status(path: Path, status: FineTuneJobStatus) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(status.to_wire(), indent=2) + "\n")
    partial.replace(path)


def _stage_subprocess(config: StageConfig, report_path: Path, use_ray: bool) -> tuple[int, StageReport | None]:
    """Run the stage entrypoint in a child process: the same path the operator uses, with a clean interpreter each time."""
    report_path.unlink(missing_ok=True)
    source_roots = {
        str(Path(module.__file__).resolve().parents[1])
        for module in (sys.modules["finetune_api"], sys.modules["finetune_trainer"])
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*sorted(source_roots), *filter(None, [env.get("PYTHONPATH")])])
    command = [
        sys.executable,
        "-m",
        "finetune_trainer.stage",
        "--config-json",
        config.model_dump_json(),
        "--report",
        f"file://{report_path}",
    ]
    if not use_ray:
        command.append("--no-ray")
    code = subprocess.call(command, env=env)
    try:
        return code, StageReport.model_validate_json(report_path.read_text())
    except (OSError, ValueError):
        return code, None


def _metrics_cell(metrics: dict[str, float]) -> str:
    shown = [k for k in _TABLE_METRICS if k in metrics]
    shown += [k for k in sorted(metrics) if k not in shown and not k.startswith(("perplexity_", "train_"))]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in shown[:_TABLE_METRIC_COUNT]) or "-"


def _print_table(status: FineTuneJobStatus, durations: dict[str, float | None]) -> None:
    rows = [("STAGE", "TYPE", "PHASE", "DURATION", "METRICS", "CHECKPOINT")]
    for stage in status.stages:
        rows.append(
            (
                stage.name,
                stage.type,
                stage.phase,
                format_duration(durations.get(stage.name)),
                _metrics_cell(stage.metrics),
                stage.checkpoint or stage.last_checkpoint or "-",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _seconds_between(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    return (
        datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
    ).total_seconds()


def run_pipeline(job: FineTuneJob, status_file: str | Path | None, use_ray: bool) -> int:
    """Run every stage in order; write the FineTuneJobStatus after each transition. Returns the process exit code."""
    spec, name = job.spec, job.metadata.name
    status_path = Path(status_file) if status_file else default_status_file(job)
    previous = _previous_status(status_path, job)
    status = previous or FineTuneJobStatus(stages=[StageStatus(name=s.name, type=s.type) for s in spec.stages])
    status.phase, status.completion_time = JobPhase.running.value, None
    status.start_time = status.start_time or now_rfc3339()
    status.set_condition(ConditionType.running, True, "StagesRunning", f"running {len(spec.stages)} stage(s) locally")
    status.set_condition(ConditionType.failed, False, "NoFailure")
    status.set_condition(ConditionType.succeeded, False, "StagesRunning")
    durations: dict[str, float | None] = {}
    for index, stage_spec in enumerate(spec.stages):
        stage = status.stages[index]
        config = render_stage(name, spec, stage_spec.name, attempt=stage.attempts + 1)
        if stage.phase == StagePhase.succeeded.value and _output_complete(config):
            print(f"[{stage.name}] already succeeded; output {stage.checkpoint}", flush=True)
            durations[stage.name] = _seconds_between(stage.start_time, stage.completion_time)
            continue
        stage.phase, stage.attempts, stage.message = StagePhase.running.value, stage.attempts + 1, ""
        stage.start_time = stage.start_time or now_rfc3339()
        stage.completion_time = None
        status.current_stage, status.progress = stage.name, f"{index}/{len(spec.stages)}"
        _write_status(status_path, status)
        print(
            f"[{stage.name}] {stage.type} stage {index + 1}/{len(spec.stages)}, attempt {stage.attempts}: {config.input_model} -> {config.output_uri}",
            flush=True,
        )
        started = time.monotonic()
        try:
            code, report = _stage_subprocess(config, _report_path(job, stage.name, status_path), use_ray)
        except KeyboardInterrupt:
            code, report = 130, None
        durations[stage.name] = time.monotonic() - started
        stage.completion_time = now_rfc3339()
        if report is not None:
            stage.metrics.update(report.metrics)
            stage.last_checkpoint = report.last_checkpoint or stage.last_checkpoint
        if code == 0 and report is not None and report.phase == "Succeeded":
            stage.phase, stage.checkpoint, stage.message = (
                StagePhase.succeeded.value,
                report.checkpoint,
                "stage finished",
            )
            status.progress = f"{index + 1}/{len(spec.stages)}"
            _write_status(status_path, status)
            continue
        reason = (
            report.reason
            if report is not None and report.reason
            else ("Interrupted" if code in (130, -2) else "TrainingFailed")
        )
        message = report.message if report is not None and report.message else f"stage process exited with code {code}"
        permanent = code == EXIT_PERMANENT_FAILURE
        stage.phase, stage.message = StagePhase.failed.value, f"{reason}: {message}"
        status.phase, status.completion_time = JobPhase.failed.value, now_rfc3339()
        status.set_condition(ConditionType.running, False, reason, f"stage {stage.name} failed")
        status.set_condition(ConditionType.failed, True, reason, f"stage {stage.name!r} failed: {message}")
        _write_status(status_path, status)
        _print_table(status, durations)
        hint = "" if permanent else " (re-run to resume from the latest checkpoint)"
        print(f"\nfinetune run: stage {stage.name!r} ({stage.type}) failed: {reason}: {message}{hint}", file=sys.stderr)
        print(f"status: {status_path}", file=sys.stderr)
        return 130 if reason == "Interrupted" else 1
    status.phase, status.completion_time, status.current_stage = JobPhase.succeeded.value, now_rfc3339(), None
    status.progress = f"{len(spec.stages)}/{len(spec.stages)}"
    status.set_condition(ConditionType.running, False, "Completed", "all stages finished")
    status.set_condition(ConditionType.succeeded, True, "Completed", f"{len(spec.stages)} stage(s) succeeded")
    _write_status(status_path, status)
    _print_table(status, durations)
    print(f"\nstatus: {status_path}")
    return 0


def run_manifest(path: str, status_file: str | None, use_ray: bool) -> int:
    try:
        job = load_manifest(path)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 2
    return run_pipeline(job, status_file, use_ray)
