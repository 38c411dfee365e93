"""Soak: many two-stage jobs through whole lifecycles, a quarter failing once, the operator killed on the way.

The RayJobs go through the status transitions KubeRay writes (as in test_controller) and the trainer's reports are
written as the trainer writes them; `FINETUNE_SOAK_JOBS` sets the number of jobs (default 200; the figures in
docs/benchmarks.md are for 1000).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune_api.reasons import Reason
from finetune_api.render import rayjob_name, stage_configmap_name
from finetune_api.report import StageReport
from finetune_dev.testing import OperatorProcess, install_chart_rbac
from finetune_operator.children import ATTEMPT_LABEL, JOB_LABEL, STAGE_LABEL
from finetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB, Kube

pytestmark = pytest.mark.slow

JOBS = int(os.environ.get("FINETUNE_SOAK_JOBS", "200"))
FAST = {"FINETUNE_RETRY_BASE_SECONDS": "1", "FINETUNE_RESYNC_SECONDS": "30"}
DONE = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-01-01T00:00:00Z"}
FAILED = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "worker lost"}


def manifest(name: str) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "s3://models/base"},
            "storage": {"uri": f"s3://runs/{name}"},
            "backoffLimit": 1,
            "stages": [
                {"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}},
                {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
            ],
        },
    }


def fails_once(job: str) -> bool:
    return int(job.rsplit("-", 1)[1]) % 4 == 0


def wait_all_have_status(admin: Kube, namespace: str, count: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        items = admin.request("GET", admin.path(FINETUNEJOB, namespace)).get("items", [])
        if sum(1 for item in items if (item.get("status") or {}).get("phase")) >= count:
            return
        time.sleep(1)
    raise AssertionError("jobs of the second wave got no status in time")


def rss_bytes(operator: OperatorProcess) -> int:
    for line in Path(f"/proc/{operator.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class KubeRayAndTrainers:
    """Takes each new RayJob through to its end once: the trainer's final report, then KubeRay's final status."""

    def __init__(self, admin: Kube, namespace: str):
        self.admin, self.namespace = admin, namespace
        self.finished: set[str] = set()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(8)

    def finish(self, rayjob: dict) -> None:
        labels = rayjob["metadata"]["labels"]
        job, stage, attempt = labels[JOB_LABEL], labels[STAGE_LABEL], int(labels[ATTEMPT_LABEL])
        fail = stage == "sft" and attempt == 1 and fails_once(job)
        report = (
            StageReport(phase="Running", attempt=attempt, last_checkpoint=f"s3://runs/{job}/sft/checkpoints/c-5")
            if fail
            else StageReport(phase="Succeeded", attempt=attempt, checkpoint=f"s3://runs/{job}/{stage}/model")
        )
        data = {"data": {"report.json": json.dumps(report.to_wire())}}
        self.admin.patch(CONFIGMAP, self.namespace, stage_configmap_name(job, stage), data)
        status = {"status": FAILED if fail else DONE}
        self.admin.patch(RAYJOB, self.namespace, rayjob["metadata"]["name"], status, subresource="status")

    def run(self) -> None:
        while not self.stop.is_set():
            fresh = [
                r
                for r in self.admin.list(RAYJOB, self.namespace, JOB_LABEL)
                if r["metadata"]["name"] not in self.finished
            ]
            self.finished.update(r["metadata"]["name"] for r in fresh)
            list(self.pool.map(self.finish, fresh))
            time.sleep(0.5)


def test_soak_every_job_finishes_with_exact_attempts_and_events_through_an_operator_kill(
    control_plane, namespace, tmp_path
):
    kubeconfig = install_chart_rbac(control_plane, f"op-{namespace}", namespace, "kuberay", [namespace])
    operator = OperatorProcess(kubeconfig, tmp_path / "operator.log", "kuberay", (namespace,), env=FAST).start()
    admin = Kube.connect(str(control_plane.kubeconfig))
    driver = KubeRayAndTrainers(admin, namespace)

    def job_in(name: str) -> dict:
        return {**manifest(name), "metadata": {"name": name, "namespace": namespace}}

    threading.Thread(target=driver.run, daemon=True).start()
    try:
        time.sleep(2)
        idle = rss_bytes(operator)
        names = [f"soak-{index:05d}" for index in range(JOBS)]
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda name: admin.create({**manifest(name), "metadata": {"name": name, "namespace": namespace}}),
                    names,
                )
            )

        def succeeded() -> int:
            items = admin.request("GET", admin.path(FINETUNEJOB, namespace)).get("items", [])
            return sum(1 for item in items if (item.get("status") or {}).get("phase") == "Succeeded")

        deadline = time.monotonic() + 120 + JOBS
        while len(driver.finished) < JOBS and time.monotonic() < deadline:
            time.sleep(0.5)
        operator.kill()  # mid-run: stages have started, failed and finished that the new operator must not repeat
        operator.start()
        while succeeded() < JOBS and time.monotonic() < deadline:
            time.sleep(2)
        assert succeeded() == JOBS, f"{JOBS - succeeded()} jobs stuck\n{operator.log_tail()}"
        peak = rss_bytes(operator)

        rayjobs: dict[str, list[str]] = {}
        for item in admin.list(RAYJOB, namespace, JOB_LABEL):
            rayjobs.setdefault(item["metadata"]["labels"][JOB_LABEL], []).append(item["metadata"]["name"])
        events: dict[str, list[str]] = {}
        for event in admin.request("GET", f"/api/v1/namespaces/{namespace}/events").get("items", []):
            events.setdefault(event["involvedObject"]["name"], []).append(event["reason"])
        statuses = {
            item["metadata"]["name"]: item["status"]
            for item in admin.request("GET", admin.path(FINETUNEJOB, namespace))["items"]
        }
        for name in names:
            attempts = [2, 1] if fails_once(name) else [1, 1]
            expected = [rayjob_name(name, "sft", a) for a in range(1, attempts[0] + 1)] + [rayjob_name(name, "dpo", 1)]
            assert sorted(rayjobs[name]) == sorted(expected), name  # no stage ran twice, no retry was lost
            assert [s["attempts"] for s in statuses[name]["stages"]] == attempts, name
            # One Event per transition, the kill notwithstanding.
            reasons = events.get(name, [])
            assert reasons.count(Reason.STAGE_STARTING) == sum(attempts), (name, reasons)
            assert reasons.count(Reason.STAGE_SUCCEEDED) == 2, (name, reasons)
            assert reasons.count(Reason.ALL_STAGES_SUCCEEDED) == 1, (name, reasons)

        def create_and_delete(wave: list[str], wait_for) -> int:
            with ThreadPoolExecutor(8) as pool:
                list(
                    pool.map(
                        lambda name: admin.create(job_in(name)),
                        [n for n in wave if admin.get(FINETUNEJOB, namespace, n) is None],
                    )
                )
                wait_for()
                list(pool.map(lambda name: admin.delete(FINETUNEJOB, namespace, name), wave))
            time.sleep(10)
            return rss_bytes(operator)

        after = create_and_delete(names, lambda: None)
        # A second wave, created and deleted once every job has its status: what the first left behind is reused,
        # not added to (Python keeps freed memory for reuse rather than returning it).
        second = [f"again-{index:05d}" for index in range(JOBS)]
        again = create_and_delete(
            second, lambda: wait_all_have_status(admin, namespace, len(second), time.monotonic() + 120 + JOBS)
        )
        print(
            f"soak {JOBS} jobs: operator RSS idle {idle / 2**20:.0f} MiB, all succeeded {peak / 2**20:.0f} MiB, "
            f"after deleting them {after / 2**20:.0f} MiB, after a second wave {again / 2**20:.0f} MiB"
        )
        assert again <= after + 10 * 2**20, "a second wave of jobs grew the operator's memory: something leaks"
        assert operator.process.poll() is None
    finally:
        driver.stop.set()
        operator.stop()
