"""How the operator copes with many FineTuneJobs at once, as a ratio to the API server's own limit.

    python bench/operator_scale.py [N ...] [--repeats K] [--delete]       (default: 1000, once)

For each N, three runs, each on a fresh local control plane (etcd, kube-apiserver, kube-controller-manager for garbage
collection, KubeRay's CRDs):
- **baseline**: an async raw client, 64 requests in flight, creates each FineTuneJob (as cluster admin, like the
  users) and then exactly the objects the operator creates to start its first stage (built by the operator's own
  builders), and one status patch. Nothing else runs: this is what the API server on this machine can take.
  - `admin`: the starts as cluster admin too, whom the API server neither authorizes nor queues (system:masters);
  - `operator SA`: the starts as the operator's ServiceAccount with the chart's RBAC: the same requests, with the
    authorization, RBAC escalation checks and priority-and-fairness queueing every operator's requests get;
- **operator**: the operator as a subprocess (cluster-wide, the chart's RBAC, the kuberay executor: RayJobs are
  created, nothing runs them), and the same async client creating the N FineTuneJobs.
The ratio divides each run's time by the `operator SA` baseline's.
Measured: create -> RayJob latency (p50/p99, from a watch that continues from its resourceVersion), the time from the
first create until every job shows a status, its ratio to the baseline's, API requests per job by verb and the 429s
(the apiserver's own `/metrics`), the operator's peak RSS and CPU; with `--delete`, the time until deleting every job
has left nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from finetune_api.pipeline import JobRef
from finetune_api.render import render_stage
from finetune_api.spec import FineTuneJobSpec
from finetune_dev import ControlPlane
from finetune_dev.testing import OperatorProcess, install_chart_rbac
from finetune_operator import children
from finetune_operator.kube import FINETUNEJOB, Kube, load_configuration
from finetune_operator.settings import Settings

NAMESPACE = "bench"
OPERATOR_NAMESPACE = "finetune-system"
IN_FLIGHT = 64
WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE")
REQUEST_LINE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)


def job(name: str) -> dict[str, Any]:
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


class Client:
    """aiohttp with a kubeconfig's credentials (client certificate or token), `IN_FLIGHT` requests at most."""

    def __init__(self, kubeconfig: Path):
        configuration = load_configuration(str(kubeconfig))
        self.host = configuration.host
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        token = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
            "authorization"
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=IN_FLIGHT),
            headers={"Authorization": token} if token else None,
        )
        self.slots = asyncio.Semaphore(IN_FLIGHT)

    async def call(self, method: str, path: str, body: Any = None, patch: bool = False) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json" if patch else "application/json"}
        async with self.slots, self.session.request(method, self.host + path, json=body, headers=headers) as reply:
            text = await reply.text()
            if reply.status >= 400 and reply.status != 409:
                raise RuntimeError(f"{method} {path}: {reply.status} {text[:300]}")
            return json.loads(text) if text.startswith("{") else {}

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind = (manifest["apiVersion"], manifest["kind"])
        return await self.call("POST", Kube.path(kind, manifest["metadata"].get("namespace")), manifest)

    async def request_counts(self) -> collections.Counter:
        """apiserver_request_total by verb (and `429`), summed over resources."""
        async with self.session.get(self.host + "/metrics") as reply:
            text = await reply.text()
        counts: collections.Counter = collections.Counter()
        for match in REQUEST_LINE.finditer(text):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            if labels.get("resource") in (
                "finetunejobs",
                "rayjobs",
                "configmaps",
                "serviceaccounts",
                "roles",
                "rolebindings",
                "events",
            ):
                counts[labels["verb"]] += float(match["value"])
            if labels.get("code") == "429":
                counts["429"] += float(match["value"])
        return counts

    async def watch_rayjobs(self, seen: dict[str, float]) -> None:
        """RayJob ADDED times by job; after each timeout the watch continues from the last resourceVersion."""
        path = Kube.path(("ray.io/v1", "RayJob"), NAMESPACE)
        version = (await self.call("GET", path)).get("metadata", {}).get("resourceVersion", "0")
        while True:
            query = {"watch": "1", "resourceVersion": version, "timeoutSeconds": "30", "allowWatchBookmarks": "1"}
            async with self.session.get(self.host + path, params=query, timeout=aiohttp.ClientTimeout(None)) as reply:
                async for line in reply.content:
                    event = json.loads(line)
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] == "ADDED":
                        seen.setdefault(event["object"]["metadata"]["labels"][children.JOB_LABEL], time.monotonic())

    async def close(self) -> None:
        await self.session.close()


async def count_with_status(client: Client) -> int:
    items = (await client.call("GET", Kube.path(FINETUNEJOB, NAMESPACE))).get("items", [])
    return sum(1 for item in items if (item.get("status") or {}).get("phase"))


async def baseline_start(
    client: Client, starter: Client, name: str, settings: Settings, created_at: dict[str, float]
) -> None:
    """One job (by `client`) and what the operator creates to start it, then one status patch (by `starter`): the
    minimal writes."""
    created = await client.create(job(name))
    created_at[name] = time.monotonic()
    ref = JobRef.from_body(created)
    spec = FineTuneJobSpec.model_validate(created["spec"])
    config = render_stage(name, spec, "sft", namespace=NAMESPACE)
    manifests = [
        children.trainer_service_account(ref),
        children.stage_configmap(ref, config),
        children.rayjob(ref, spec, config, settings, None),
        *children.trainer_report_access(ref, spec),
    ]
    for manifest in manifests:
        await starter.create(manifest)
    path = Kube.path(FINETUNEJOB, NAMESPACE, name, "status")
    await starter.call("PATCH", path, {"status": {"phase": "Pending"}}, patch=True)


async def measure(count: int, workdir: Path, run: str, delete: bool) -> dict[str, float]:
    """`run`: "admin" or "operator SA" (a baseline), or "operator"."""
    baseline = run != "operator"
    with ControlPlane(components=("kube-controller-manager",)) as cluster:
        cluster.create_namespace(NAMESPACE)
        cluster.create_namespace(OPERATOR_NAMESPACE)
        operator = None
        client = Client(cluster.kubeconfig)
        starter = client
        if run != "admin":
            kubeconfig = install_chart_rbac(cluster, "finetune-operator", OPERATOR_NAMESPACE, "kuberay", [])
            if baseline:
                starter = Client(kubeconfig)
            else:
                operator = OperatorProcess(kubeconfig, workdir / f"operator-{count}.log", "kuberay").start()
        seen: dict[str, float] = {}
        watcher = asyncio.create_task(client.watch_rayjobs(seen))
        try:
            before = await client.request_counts()
            names = [f"job-{index:05d}" for index in range(count)]
            created: dict[str, float] = {}
            settings = Settings()

            async def start(name: str) -> None:
                if baseline:
                    await baseline_start(client, starter, name, settings, created)
                else:
                    await client.create(job(name))
                    created[name] = time.monotonic()

            started = time.monotonic()
            await asyncio.gather(*(start(name) for name in names))
            create_seconds = time.monotonic() - started
            deadline = time.monotonic() + 1800
            while len(seen) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            while await count_with_status(client) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            all_status_seconds = time.monotonic() - started
            latencies = [seen[name] - created[name] for name in created if name in seen]
            if len(latencies) < count:
                raise RuntimeError(f"only {len(latencies)} of {count} jobs got a RayJob in time; see {workdir}")
            await asyncio.sleep(2)  # the last Events and status writes
            counts = await client.request_counts() - before
            result = {
                "create_seconds": create_seconds,
                "rayjob_p50": statistics.median(latencies),
                "rayjob_p99": percentile(latencies, 0.99),
                "all_status_seconds": all_status_seconds,
                # The job's own create is the client's, not a write of the start.
                "writes_per_job": sum(counts[verb] for verb in WRITE_VERBS) / count - 1,
                "verbs_per_job": {verb: counts[verb] / count for verb in sorted(counts) if verb != "429"},
                "rejected_429": counts["429"],
            }
            if operator is not None:
                result["peak_rss_mib"] = operator.peak_rss_bytes() / 2**20
                result["operator_cpu_seconds"] = operator.cpu_seconds()
            if delete:
                result["delete_seconds"] = await delete_all(client, names)
            return result
        finally:
            watcher.cancel()
            await client.close()
            if starter is not client:
                await starter.close()
            if operator is not None:
                operator.stop()


async def delete_all(client: Client, names: list[str]) -> float:
    """Delete every job; seconds until neither they nor any child (garbage-collected) remains."""
    started = time.monotonic()
    await asyncio.gather(*(client.call("DELETE", Kube.path(FINETUNEJOB, NAMESPACE, name)) for name in names))
    kinds = [FINETUNEJOB, ("ray.io/v1", "RayJob"), ("v1", "ConfigMap"), ("v1", "ServiceAccount")]
    while True:
        left = 0
        for kind in kinds:
            query = "" if kind == FINETUNEJOB else f"?labelSelector={children.JOB_LABEL}"
            left += len((await client.call("GET", Kube.path(kind, NAMESPACE) + query)).get("items", []))
        if not left:
            return time.monotonic() - started
        if time.monotonic() - started > 1800:
            raise RuntimeError(f"{left} objects left 30 minutes after deleting every job")
        await asyncio.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("counts", nargs="*", type=int, default=[1000])
    parser.add_argument("--delete", action="store_true", help="also time deleting every job (operator run)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="the three runs this many times per N; the ratio's median and range"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    print(
        "| FineTuneJobs | run | all have status (s) | ratio | create -> RayJob p50 (s) | p99 (s) | writes/job "
        "| requests/job by verb | 429s | operator RSS (MiB) | operator CPU (s) | delete all (s) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for count in args.counts:
        ratios = []
        for _ in range(args.repeats):
            runs = {
                "baseline, admin": asyncio.run(measure(count, workdir, "admin", delete=False)),
                "baseline, operator SA": asyncio.run(measure(count, workdir, "operator SA", delete=False)),
                "operator": asyncio.run(measure(count, workdir, "operator", delete=args.delete)),
            }
            base = runs["baseline, operator SA"]
            ratios.append(runs["operator"]["all_status_seconds"] / base["all_status_seconds"])
            for label, result in runs.items():
                verbs = ", ".join(f"{verb} {value:.1f}" for verb, value in result["verbs_per_job"].items())
                print(
                    f"| {count} | {label} | {result['all_status_seconds']:.1f} "
                    f"| {result['all_status_seconds'] / base['all_status_seconds']:.2f} "
                    f"| {result['rayjob_p50']:.2f} | {result['rayjob_p99']:.2f} | {result['writes_per_job']:.1f} "
                    f"| {verbs} | {result['rejected_429']:.0f} | {result.get('peak_rss_mib', 0):.0f} "
                    f"| {result.get('operator_cpu_seconds', 0):.1f} | {result.get('delete_seconds', 0):.1f} |",
                    flush=True,
                )
        if len(ratios) > 1:
            print(
                f"{count} jobs, operator / its own `operator SA` baseline over {len(ratios)} repeats: median "
                f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}",
                file=sys.stderr,
            )
    print(f"operator logs: {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
