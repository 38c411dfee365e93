"""How the operator copes with many FineTuneJobs at once.

    python bench/operator_scale.py [N ...]        (default: 200 1000)

For each N: a fresh local control plane (etcd + kube-apiserver, KubeRay's CRDs), the operator as a subprocess in
cluster-wide mode with the chart's RBAC and the kuberay executor (RayJobs are created; nothing runs them), then N
FineTuneJobs created by 8 client threads. Measured: create -> RayJob created latency (p50/p99, from a watch), the time
until every job shows a status, and the operator's peak RSS and CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes

from finetune_dev import ControlPlane
from finetune_dev.testing import OperatorProcess, install_chart_rbac
from finetune_operator.kube import FINETUNEJOB, Kube

NAMESPACE = "bench"
OPERATOR_NAMESPACE = "finetune-system"


def job(name: str) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "s3://models/base"},
            "storage": {"uri": f"s3://runs/{name}"},
            "stages": [
                {"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}},
                {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
            ],
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def watch_rayjobs(kubeconfig: Path, seen: dict[str, float], stop: threading.Event) -> None:
    api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(kubeconfig)))
    while not stop.is_set():
        for event in kubernetes.watch.Watch().stream(
            api.list_namespaced_custom_object, "ray.io", "v1", NAMESPACE, "rayjobs", timeout_seconds=5
        ):
            if event["type"] == "ADDED":
                seen.setdefault(event["object"]["metadata"]["labels"]["finetune.dev/job"], time.monotonic())


def run(count: int, workdir: Path) -> dict[str, float]:
    with ControlPlane() as cluster:
        cluster.create_namespace(NAMESPACE)
        cluster.create_namespace(OPERATOR_NAMESPACE)
        kubeconfig = install_chart_rbac(cluster, "finetune-operator", OPERATOR_NAMESPACE, "kuberay", [])
        operator = OperatorProcess(kubeconfig, workdir / f"operator-{count}.log", "kuberay")
        admin = Kube.connect(str(cluster.kubeconfig))
        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_rayjobs, args=(cluster.kubeconfig, seen, stop), daemon=True)
        with operator:
            watcher.start()
            created: dict[str, float] = {}

            def create(index: int) -> None:
                name = f"job-{index:05d}"
                admin.create(job(name))
                created[name] = time.monotonic()

            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(create, range(count)))
            create_seconds = time.monotonic() - started
            deadline = time.monotonic() + 600
            while len(seen) < count and time.monotonic() < deadline:
                time.sleep(0.2)
            while time.monotonic() < deadline:
                items = admin.request("GET", admin.path(FINETUNEJOB, NAMESPACE)).get("items", [])
                if sum(1 for item in items if (item.get("status") or {}).get("phase")) == count:
                    break
                time.sleep(0.5)
            all_status_seconds = time.monotonic() - started
            latencies = [seen[name] - created[name] for name in created if name in seen]
            rss, cpu = operator.peak_rss_bytes(), operator.cpu_seconds()
            stop.set()
        if len(latencies) < count:
            raise RuntimeError(
                f"only {len(latencies)} of {count} jobs got a RayJob within 10 minutes; see {operator.log_path}"
            )
        return {
            "jobs": count,
            "create_seconds": create_seconds,
            "rayjob_p50": statistics.median(latencies),
            "rayjob_p99": percentile(latencies, 0.99),
            "all_status_seconds": all_status_seconds,
            "peak_rss_mib": rss / 2**20,
            "operator_cpu_seconds": cpu,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("counts", nargs="*", type=int, default=[200, 1000])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    print(
        "| FineTuneJobs | create all (s) | create -> RayJob p50 (s) | p99 (s) | all have status (s) | operator peak RSS (MiB) | operator CPU (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count in args.counts:
        result = run(count, workdir)
        print(
            f"| {count} | {result['create_seconds']:.1f} | {result['rayjob_p50']:.2f} | {result['rayjob_p99']:.2f} "
            f"| {result['all_status_seconds']:.1f} | {result['peak_rss_mib']:.0f} | {result['operator_cpu_seconds']:.1f} |",
            flush=True,
        )
    print(f"operator logs: {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
