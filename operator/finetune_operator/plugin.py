"""`kubectl finetune`: a kubectl plugin (the executable `kubectl-finetune`) for FineTuneJobs.

kubectl finetune status NAME [-n NS]            the stage table `finetune run` prints, from the resource's status
kubectl finetune logs NAME [--stage S] [-n NS]  the driver log of a stage's latest RayJob (the current stage's by default)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import kubernetes

from finetune_api.status import FineTuneJobStatus
from finetune_api.table import stage_table, summary_line
from finetune_operator.kube import FINETUNEJOB, Kube


def current_namespace() -> str:
    try:
        _, active = kubernetes.config.list_kube_config_contexts()
    except (kubernetes.config.ConfigException, OSError):
        return "default"
    return (active or {}).get("context", {}).get("namespace") or "default"


def logs_command(status: FineTuneJobStatus, namespace: str, stage: str | None) -> list[str]:
    """kubectl's argv for the driver log of `stage`'s latest attempt.

    In K8sJobMode KubeRay runs `ray job submit` in a submitter Job named after the RayJob
    (ray-operator/controllers/ray/rayjob_controller.go, createNewK8sJob), and that command follows the driver's log.
    """
    name = stage or status.current_stage or (status.stages[-1].name if status.stages else None)
    entry = next((s for s in status.stages if s.name == name), None)
    if entry is None:
        raise SystemExit(f"kubectl finetune: no stage {name!r}; stages: {', '.join(s.name for s in status.stages)}")
    if not entry.ray_job:
        raise SystemExit(f"kubectl finetune: stage {name!r} has not started")
    return ["kubectl", "logs", f"job/{entry.ray_job}", "-n", namespace, "--all-containers"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubectl finetune", description="Inspect FineTuneJobs.")
    parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig file")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="the stage table of a FineTuneJob")
    status.add_argument("name")
    logs = commands.add_parser("logs", help="the driver log of a stage's latest RayJob")
    logs.add_argument("name")
    logs.add_argument("--stage", help="stage name (default: the current stage)")
    args = parser.parse_args(argv)

    namespace = args.namespace or current_namespace()
    kube = Kube.connect(args.kubeconfig)
    job = kube.get(FINETUNEJOB, namespace, args.name)
    if job is None:
        print(f"kubectl finetune: finetunejob {args.name!r} not found in namespace {namespace!r}", file=sys.stderr)
        return 1
    job_status = FineTuneJobStatus.model_validate(job.get("status") or {})
    if args.command == "status":
        print(summary_line(job_status))
        print("\n".join(["", *stage_table(job_status)]))
        return 0
    return subprocess.call(logs_command(job_status, namespace, args.stage))


if __name__ == "__main__":
    sys.exit(main())
