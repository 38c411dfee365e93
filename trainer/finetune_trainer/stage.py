"""Stage entrypoint for the operator's RayJob and for `finetune run`:

    python -m finetune_trainer.stage --config-json '<StageConfig JSON>' --report configmap://NS/NAME | file:///PATH [--no-ray]

Exit 0 on success, 3 (EXIT_PERMANENT_FAILURE) on a failure no retry can fix, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from finetune_api.render import StageConfig
from finetune_api.report import EXIT_PERMANENT_FAILURE, StageReport
from finetune_trainer.errors import StageError
from finetune_trainer.reporting import ConsoleReporter, TeeReporter, reporter_from_url


def run_from_args(config_path: str | None, config_json: str | None, report_url: str, use_ray: bool) -> int:
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
        reporter.publish(StageReport(phase="Failed", reason="InvalidConfig", message=message), urgent=True)
        return EXIT_PERMANENT_FAILURE
    from finetune_trainer.runner import run_stage

    try:
        run_stage(config, TeeReporter(reporter, ConsoleReporter(config.stage.name)), use_ray)
    except StageError as error:
        return EXIT_PERMANENT_FAILURE if error.permanent else 1
    except Exception:  # noqa: BLE001 - already reported and printed by run_stage
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer.stage", description="Run one rendered FineTuneJob stage."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", "--config-file", dest="config", help="path to a StageConfig JSON file")
    source.add_argument("--config-json", help="StageConfig JSON")
    parser.add_argument("--report", required=True, help="configmap://NAMESPACE/NAME or file:///PATH")
    parser.add_argument("--no-ray", action="store_true", help="train in this process instead of Ray Train workers")
    args = parser.parse_args(argv)
    sys.exit(run_from_args(args.config, args.config_json, args.report, use_ray=not args.no_ray))


if __name__ == "__main__":
    main()
