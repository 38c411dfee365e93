"""A FineTuneJob through the operator, KubeRay and a real Ray cluster per stage.

Nothing plays KubeRay or Ray here. The operator creates the RayJob; KubeRay v1.5.1 builds its RayCluster, submits the
entrypoint through the head's Jobs API (HTTPMode, reached over the apiserver's service proxy) and maps the Ray job's
state into `RayJob.status`; the scheduler binds the Pods to KWOK nodes, and `PodRunner` runs their containers (the
`ray start` commands KubeRay wrote, its init containers, the volumes, the ServiceAccount token) as processes in Pod
namespaces. The trainer reports through its ConfigMap with its own ServiceAccount's bound token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_neighbours import FAST, KUBERAY, Neighbourhood, _exists, create_bound_claim, wait

from finetune_api.render import rayjob_name
from finetune_dev import ControlPlane
from finetune_dev.podrunner import PodRunner, available
from finetune_dev.testing import REPO_ROOT, OperatorProcess, install_chart_rbac, source_env

pytestmark = [pytest.mark.slow, pytest.mark.neighbours(*KUBERAY)]

POOL = {"finetune.dev/pool": "ray-local"}
GPU_POOL = {"finetune.dev/pool": "ray-local-gpu"}
NODES = ("ray-local-0", "ray-local-1")
GPU_NODE = "ray-local-gpu-0"
DATA = REPO_ROOT / "examples" / "data"
# A chat template that every shell on the way would change: quotes, a variable, a backslash, Jinja braces.
TEMPLATE = (
    "{#- it's $HOME, \\n and `pwd` -#}{{ '<s>' }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    '{{ m["content"] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)


@pytest.fixture
def ray_hood(cluster: ControlPlane, tmp_path: Path):
    problem = available()
    if problem:
        pytest.skip(problem)
    existing = {n["metadata"]["name"] for n in cluster.api("GET", "/api/v1/nodes").get("items", [])}
    for name in NODES:
        if name not in existing:
            cluster.create_node(name, cpu="8", memory="32Gi", labels=POOL)
    if GPU_NODE not in existing:
        # A node that advertises a GPU it does not have: KubeRay starts Ray there with `--num-gpus=1`.
        cluster.create_node(GPU_NODE, cpu="8", memory="32Gi", gpus=1, labels=GPU_POOL)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(namespace)
    wait(
        lambda: _exists(cluster, f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        "the default ServiceAccount",
    )
    create_bound_claim(cluster, namespace, "runs")
    volume = Path(f"/tmp/{namespace}-runs")
    _prepare_volume(volume)
    kubeconfig = install_chart_rbac(cluster, f"op-{namespace}", namespace, "kuberay", [namespace])
    operator = OperatorProcess(
        kubeconfig,
        tmp_path / "operator.log",
        "kuberay",
        (namespace,),
        env={**FAST, "FINETUNE_START_TIMEOUT_SECONDS": "300"},
    )
    with PodRunner(cluster, (*NODES, GPU_NODE), tmp_path / "pods") as pods, operator:
        yield Neighbourhood(cluster, namespace, operator), pods, volume
    cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")
    shutil.rmtree(volume, ignore_errors=True)


def _prepare_volume(volume: Path) -> None:
    """The claim's content: the tiny model and the example data, writable by the Pods' user (a hostPath volume is not
    given to the Pod's fsGroup)."""
    (volume / "data").mkdir(parents=True, exist_ok=True)
    for name in ("domain.txt", "instruct.jsonl"):
        shutil.copy(DATA / name, volume / "data" / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer",
            "tiny-model",
            str(volume / "models" / "tiny"),
            "--data-dir",
            str(DATA),
        ],
        check=True,
        env=source_env(),
        capture_output=True,
    )
    for path in [volume, *volume.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)


def pipeline(name: str) -> dict:
    small = {"maxSteps": 12, "batchSize": 8, "maxLength": 48, "loggingSteps": 4, "saveSteps": 6, "learningRate": 0.003}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://runs/models/tiny", "chatTemplate": TEMPLATE},
            "storage": {"uri": f"pvc://runs/out/{name}"},
            "backoffLimit": 0,
            "peft": {"method": "full"},
            "resources": {"workers": 1, "cpusPerWorker": 1, "memoryPerWorker": "4Gi", "nodeSelector": dict(POOL)},
            "stages": [
                {"name": "cpt", "type": "cpt", "dataset": {"uri": "pvc://runs/data/domain.txt"}, "training": small},
                {
                    "name": "sft",
                    "type": "sft",
                    "dataset": {"uri": "pvc://runs/data/instruct.jsonl"},
                    "training": small,
                    # Two Ray Train workers in two Pods, parameters partitioned by ZeRO-3.
                    "resources": {
                        "workers": 2,
                        "cpusPerWorker": 1,
                        "memoryPerWorker": "4Gi",
                        "nodeSelector": dict(POOL),
                    },
                    "deepspeed": {"zeroStage": 3},
                },
            ],
        },
    }


def gpu_job(name: str) -> dict:
    """One stage asking for a GPU, placed on the node that advertises one it does not have."""
    manifest = pipeline(name)
    spec = manifest["spec"]
    spec["stages"] = spec["stages"][:1]
    spec["backoffLimit"] = 2
    spec["resources"] = {
        "workers": 1,
        "gpusPerWorker": 1,
        "cpusPerWorker": 1,
        "memoryPerWorker": "4Gi",
        "nodeSelector": dict(GPU_POOL),
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    return manifest


def test_jobs_run_on_real_ray_clusters(ray_hood):
    """A two-stage pipeline (the second on two Train workers in two Pods, under ZeRO-3) succeeds; meanwhile, on
    another node, a GPU stage whose worker has no CUDA fails at once, permanently, saying why."""
    hood, pods, volume = ray_hood
    for manifest in (pipeline("ray"), gpu_job("gpu")):
        manifest["metadata"]["namespace"] = hood.namespace
        hood.cluster.api("POST", hood.path("finetune.dev/v1alpha1", "finetunejobs"), manifest)

    def diagnostics() -> str:
        return f"{hood.diagnostics()}\n--- pod runner ---\n{pods.errors}\n{pods.exits}\n{pods.log('')}"

    def finished(name: str):
        def phase() -> dict | None:
            if pods.errors:
                pytest.fail(f"a Pod could not start: {diagnostics()}")
            status = (hood.job(name) or {}).get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        return phase

    # Ray placed the GPU stage's probe on the GPU node's Ray worker (it asked for a GPU); that process saw no CUDA
    # device and said so. No retry is spent on it, though backoffLimit allows two.
    gpu = wait(finished("gpu"), "the GPU stage to fail", timeout=900, log=diagnostics)
    failed = hood.condition("gpu", "Failed")
    assert gpu["phase"] == "Failed" and failed.get("reason") == "GPUUnavailable", (failed, diagnostics())
    assert "gpusPerWorker is 1 but this worker sees no CUDA device" in failed["message"]
    assert gpu["stages"][0]["attempts"] == 1, gpu["stages"][0]

    status = wait(finished("ray"), "the pipeline to finish", timeout=900, log=diagnostics)
    assert status["phase"] == "Succeeded", diagnostics()
    stages = {stage["name"]: stage for stage in status["stages"]}
    for name in ("cpt", "sft"):
        # KubeRay's own account of each Ray job, from the Jobs API: SUCCEEDED (the trainer's final report may reach
        # the operator first, while the driver exits). Its TTL may have deleted the RayJob since.
        rayjob = rayjob_name("ray", name, 1)
        wait(
            lambda: (
                (hood.rayjob(rayjob) or {"status": {"jobStatus": "SUCCEEDED"}})["status"].get("jobStatus")  # noqa: B023
                == "SUCCEEDED"
            ),
            f"KubeRay to see {rayjob} SUCCEEDED",
            timeout=120,
            log=diagnostics,
        )
        metrics = stages[name]["metrics"]
        # The report reached status through the ConfigMap, with held-out losses that fell.
        assert float(metrics["eval_loss_after"]) < float(metrics["eval_loss_before"]), metrics
    output = volume / stages["sft"]["checkpoint"].removeprefix("pvc://runs/")
    config = json.loads((output / "tokenizer_config.json").read_text())
    # The chat template went through the operator, a ConfigMap volume and both stages unchanged.
    saved = config.get("chat_template") or (output / "chat_template.jinja").read_text()
    assert saved == TEMPLATE
    assert os.path.exists(output / "model.safetensors")
