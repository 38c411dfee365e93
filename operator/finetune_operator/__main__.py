"""`finetune-operator run`: the FineTuneJob controller."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from finetune_api.version import version
from finetune_operator.settings import EXECUTORS, from_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune-operator", description="Kubernetes operator for FineTuneJob pipelines."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the controller (settings also from FINETUNE_* environment variables)")
    run.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="kuberay: a RayJob per stage (default); local: a trainer process per stage",
    )
    run.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch this namespace (repeatable); default: every namespace",
    )
    run.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 8080; 0 disables)")
    run.add_argument("--health-port", type=int, help="liveness endpoint port, /healthz (default 8081; 0 disables)")
    run.add_argument("--trainer-image", help="image of the Ray pods when a stage names none")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster ServiceAccount, else $KUBECONFIG)")
    run.add_argument("--state-dir", type=Path, help="local executor: where stage logs, pids and exit codes are kept")
    run.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        help="act only while holding the Lease in $POD_NAMESPACE, so that one of several replicas acts (default: off)",
    )
    run.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = from_env(
            executor=args.executor,
            namespaces=tuple(args.namespaces) if args.namespaces else None,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            trainer_image=args.trainer_image,
            kubeconfig=args.kubeconfig,
            state_dir=args.state_dir,
            leader_election=args.leader_elect,
        )
    except ValueError as exc:
        print(f"finetune-operator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # kopf logs every handled watch event at INFO; with many jobs that drowns what matters.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Imported here so that `--help` and bad flags answer without loading kopf and the Kubernetes client.
    from finetune_operator.handlers import run_operator
    from finetune_operator.leader import LeadershipError

    try:
        asyncio.run(run_operator(settings))
    except LeadershipError as exc:
        # Non-zero, so that Kubernetes restarts the replica, which then stands by for the lease.
        logging.getLogger("finetune_operator").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
