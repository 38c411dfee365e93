"""`finetune` command line: run or validate a manifest locally, build the tiny example model, run one stage, start a dev cluster."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description="Kubernetes-native LLM fine-tuning, runnable locally."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run every stage of a FineTuneJob manifest on this machine")
    run.add_argument("manifest", help="FineTuneJob YAML file")
    run.add_argument(
        "--status-file", help="where to write the FineTuneJobStatus JSON (default: <storage.uri>/status.json)"
    )
    run.add_argument("--no-ray", action="store_true", help="train in this process instead of Ray Train workers")

    check = commands.add_parser("validate", help="check manifests, their data and models before anything trains")
    check.add_argument("manifests", nargs="+", help="FineTuneJob YAML files")
    check.add_argument("--all", action="store_true", help="accept several FineTuneJobs per file")

    tiny = commands.add_parser(
        "tiny-model", help="build a tiny random-init Llama model and a BPE tokenizer trained on example data"
    )
    tiny.add_argument("out_dir", help="directory to write the model and tokenizer to")
    tiny.add_argument("--data-dir", default="examples/data", help="text/JSONL files to train the tokenizer on")

    stage = commands.add_parser("stage", help="run one rendered stage (the operator's RayJob entrypoint)")
    source = stage.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="path to a StageConfig JSON file")
    source.add_argument("--config-json", help="StageConfig JSON")
    stage.add_argument("--report", required=True, help="configmap://NAMESPACE/NAME or file:///PATH")
    stage.add_argument("--no-ray", action="store_true", help="train in this process instead of Ray Train workers")

    commands.add_parser("dev-cluster", help="start a local Kubernetes control plane for the operator")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dev-cluster"]:
        # The dev cluster has its own options; hand them over untouched.
        from finetune_dev.cli import main as devcluster_main

        sys.exit(devcluster_main(argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "tiny-model":
        from finetune_trainer.tiny_model import write_tiny_model

        try:
            out = write_tiny_model(args.out_dir, args.data_dir)
        except FileNotFoundError as exc:
            sys.exit(f"finetune tiny-model: {exc}")
        print(f"wrote tiny model and tokenizer to {out}")
    elif args.command == "run":
        from finetune_trainer.runner import run_manifest

        sys.exit(run_manifest(args.manifest, args.status_file, use_ray=not args.no_ray))
    elif args.command == "validate":
        from finetune_trainer.validate import validate_files

        sys.exit(validate_files(args.manifests, all_documents=args.all))
    elif args.command == "stage":
        from finetune_trainer.stage import run_from_args

        sys.exit(run_from_args(args.config, args.config_json, args.report, use_ray=not args.no_ray))
