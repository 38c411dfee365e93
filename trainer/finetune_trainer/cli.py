"""`finetune` command line: run or validate a manifest locally, print a run's status, build the tiny example model,
run one stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_api.version import version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description="Kubernetes-native LLM fine-tuning, runnable locally."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run every stage of a FineTuneJob manifest on this machine")
    run.add_argument("manifest", help="FineTuneJob YAML file")
    run.add_argument(
        "--status-file", help="where to write the FineTuneJobStatus JSON (default: <storage.uri>/status.json)"
    )
    run.add_argument(
        "--runtime",
        metavar="RUNTIME_YAML",
        help="the (Cluster)FineTuneRuntime the job's spec.runtimeRef names: its defaults and policy apply as on a cluster",
    )
    run.add_argument("--no-ray", action="store_true", help="train in this process instead of Ray Train workers")
    run.add_argument(
        "--verbose", "-v", action="store_true", help="also show the stage processes' output (always in stage.log)"
    )

    status = commands.add_parser("status", help="print the stage table of a run from its status file")
    status.add_argument("path", help="a status.json, or the storage directory that holds it")

    report = commands.add_parser("report", help="render report.html (curves, metrics, gates) of a local run")
    report.add_argument("out_dir", help="the run's storage directory (it holds status.json and a folder per stage)")
    report.add_argument("--status-file", help="the run's status file (default: OUT_DIR/status.json)")

    check = commands.add_parser("validate", help="check manifests, their data and models before anything trains")
    check.add_argument("manifests", nargs="+", help="FineTuneJob YAML files")
    check.add_argument("--all", action="store_true", help="accept several FineTuneJobs per file")
    check.add_argument("--runtime", metavar="RUNTIME_YAML", help="the runtime the jobs' spec.runtimeRef names")

    tiny = commands.add_parser(
        "tiny-model", help="build a tiny random-init Llama model and a BPE tokenizer trained on example data"
    )
    tiny.add_argument("out_dir", help="directory to write the model and tokenizer to")
    tiny.add_argument("--data-dir", default="examples/data", help="text/JSONL files to train the tokenizer on")

    from finetune_trainer import stage

    stage.add_arguments(commands.add_parser("stage", help="run one rendered stage (the operator's RayJob entrypoint)"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "tiny-model":
        from finetune_trainer.tiny_model import write_tiny_model

        try:
            out = write_tiny_model(args.out_dir, args.data_dir)
        except FileNotFoundError as exc:
            sys.exit(f"finetune tiny-model: {exc}")
        print(f"wrote tiny model and tokenizer to {out}")
    elif args.command == "run":
        from finetune_trainer.pipeline import run_manifest

        sys.exit(
            run_manifest(
                args.manifest, args.status_file, use_ray=not args.no_ray, verbose=args.verbose, runtime=args.runtime
            )
        )
    elif args.command == "status":
        sys.exit(_print_status(Path(args.path)))
    elif args.command == "report":
        from finetune_trainer.report import write_report

        status_file = Path(args.status_file) if args.status_file else None
        try:
            print(f"wrote {write_report(Path(args.out_dir), status_file)}")
        except (OSError, ValueError) as exc:
            sys.exit(f"finetune report: {exc}")
    elif args.command == "validate":
        from finetune_trainer.validate import validate_files

        sys.exit(validate_files(args.manifests, all_documents=args.all, runtime=args.runtime))
    elif args.command == "stage":
        from finetune_trainer import stage

        sys.exit(stage.run(args))


def _print_status(path: Path) -> int:
    from finetune_api.status import FineTuneJobStatus
    from finetune_api.table import print_table, summary_line

    path = path / "status.json" if path.is_dir() else path
    try:
        status = FineTuneJobStatus.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"finetune status: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    print(summary_line(status))
    print_table(status)
    return 0
