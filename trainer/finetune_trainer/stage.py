"""Stage entrypoint for the operator's RayJob and for `finetune run`: one attempt of one rendered stage.

    finetune stage --config FILE | --config-json JSON --report configmap://NS/NAME | file:///PATH [--no-ray]

Exit 0 on success, 3 (EXIT_PERMANENT_FAILURE) on a failure no retry can fix, 1 otherwise. The stage trains in this
process, or on Ray Train workers (`ray_launcher`); both run the same per-rank code (`worker`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from pydantic import ValidationError

from finetune_api.reasons import Reason
from finetune_api.render import StageConfig
from finetune_api.report import EXIT_PERMANENT_FAILURE, StageReport
from finetune_trainer import strategy
from finetune_trainer.errors import StageError
from finetune_trainer.recipes import RECIPES
from finetune_trainer.reporting import ConsoleReporter, ReportChannel, Reporter, TeeReporter, reporter_from_url


def uses_ray(config: StageConfig, use_ray: bool) -> bool:
    """Ray Train runs a stage with several workers, or any stage when a Ray cluster is configured (RAY_ADDRESS).

    A single worker on the local machine trains in-process: same code, without Ray's start-up cost.
    """
    return use_ray and (config.resources.workers > 1 or bool(os.environ.get("RAY_ADDRESS")))


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
            # The worker pulls in torch, transformers and peft: only a stage that trains here pays for them.
            from finetune_trainer.worker import execute_stage

            if config.deepspeed.zero_stage > 0:
                strategy.single_process_env()  # DeepSpeed wants a (one-process) process group
            metrics, report = execute_stage(config, reporter, rank=0, world_size=1, local_rank=0, work_dir=work_dir)
    except BaseException as exc:
        error = find_stage_error(exc)
        if error is not None:
            channel.failed(error.reason, str(error))
            raise error from None
        if isinstance(exc, KeyboardInterrupt):
            channel.failed(Reason.INTERRUPTED, "interrupted; a new attempt resumes from the latest checkpoint")
        else:
            traceback.print_exc()
            channel.failed(Reason.TRAINING_FAILED, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    channel.report = report
    channel.succeeded(metrics, config.output_uri)
    return metrics


def run_from_args(config_path: str | None, config_json: str | None, report_url: str, use_ray: bool) -> int:
    """`finetune stage`: read the config, run the attempt, map the outcome to the exit code."""
    try:
        reporter = reporter_from_url(report_url)
    except ValueError as exc:
        print(f"finetune stage: {exc}", file=sys.stderr)
        return EXIT_PERMANENT_FAILURE
    try:
        text = Path(config_path).read_text() if config_path else config_json
        config = StageConfig.model_validate_json(text)
    except (OSError, ValidationError) as exc:
        message = f"cannot read the stage config: {exc}"
        print(f"finetune stage: {message}", file=sys.stderr)
        reporter.publish(StageReport(phase="Failed", reason=Reason.INVALID_CONFIG, message=message), urgent=True)
        return EXIT_PERMANENT_FAILURE
    try:
        run_stage(config, TeeReporter(reporter, ConsoleReporter(config.stage.name)), use_ray)
    except StageError as error:
        return EXIT_PERMANENT_FAILURE if error.permanent else 1
    except Exception:  # noqa: BLE001 - already reported and printed by run_stage
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The entrypoint's options, shared by `finetune stage` and `python -m finetune_trainer.stage`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", "--config-file", dest="config", help="path to a StageConfig JSON file")
    source.add_argument("--config-json", help="StageConfig JSON")
    parser.add_argument("--report", required=True, help="configmap://NAMESPACE/NAME or file:///PATH")
    parser.add_argument("--no-ray", action="store_true", help="train in this process instead of Ray Train workers")


def run(args: argparse.Namespace) -> int:
    return run_from_args(args.config, args.config_json, args.report, use_ray=not args.no_ray)


def main(argv: list[str] | None = None) -> None:
    """`python -m finetune_trainer.stage ...`, the operator's entrypoint."""
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.stage", description="Run one rendered stage.")
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
