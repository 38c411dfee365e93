"""The images, built for real from operator/Dockerfile and trainer/Dockerfile with buildah on a local Debian base
(`finetune_dev.images`), and run with `buildah run`: the operator image as the chart's Deployment runs it, against the
real apiserver; the trainer image through one tiny stage."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from finetune_api.render import rayjob_name, render_stage
from finetune_api.spec import FineTuneJobSpec
from finetune_dev import images
from finetune_dev.testing import CHART_DIR, REPO_ROOT, free_port, install_chart_rbac
from finetune_operator.children import TRAINER_UID
from finetune_operator.kube import FINETUNEJOB, RAYJOB, Kube

pytestmark = [
    pytest.mark.slow,
    pytest.mark.image,
    pytest.mark.skipif(bool(images.missing_tools()), reason=f"images cannot be built here: {images.missing_tools()}"),
]

TRAINER_IMAGE = "registry.example.com/finetune/trainer:test"


def wait_for(check, what: str, run: images.ContainerRun, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if run.process.poll() is not None:
            pytest.fail(f"the container exited with {run.process.returncode} waiting for {what}:\n{run.log_tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n--- container log ---\n{run.log_tail()}")
        time.sleep(0.3)
    return result


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def operator_image() -> str:
    return images.build_image("operator")


@pytest.fixture(scope="module")
def trainer_container():
    with images.Container(images.build_image("trainer")) as container:
        yield container


def chart_deployment(control_plane, release: str, namespace: str) -> dict:
    rendered = control_plane.helm(
        "template",
        release,
        str(CHART_DIR),
        "--namespace",
        namespace,
        "--set",
        "executor=kuberay",
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--set",
        f"trainerImage={TRAINER_IMAGE}",
    ).stdout
    return next(doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "Deployment")


def test_the_operator_image_is_read_only_and_non_root_as_the_chart_runs_it(operator_image, tmp_path):
    # Even root cannot write the image's files: the read-only root is a mount, not file permissions.
    probe = "id -u; touch /tmp/ok && echo tmp-writable; touch /opt/venv/x 2>&1; touch /etc/x 2>&1; exit 0"
    with images.Container(operator_image) as container:
        run = container.run(
            ["sh", "-c", probe], tmp_path / "probe.log", user="0:0", read_only_root=True, tmpfs=["/tmp"]
        )
        with run:
            assert run.wait(timeout=60) == 0
    lines = run.output().splitlines()
    assert lines[:2] == ["0", "tmp-writable"]
    assert all("Read-only file system" in line for line in lines[2:4]), lines
    assert images.image_entrypoint(operator_image) == ["finetune-operator", "run"]


def test_the_operator_image_reconciles_a_job_with_the_charts_service_account(
    control_plane, namespace, operator_image, tmp_path
):
    release = f"img-{namespace}"
    install_chart_rbac(control_plane, release, namespace, "kuberay", [namespace])
    deployment = chart_deployment(control_plane, release, namespace)
    pod = images.pod_settings(deployment, f"{release}-7d9f-abcde", namespace)
    assert (pod.user, pod.read_only_root, pod.drop_all_capabilities, pod.empty_dirs) == (
        "65532:65532",
        True,
        True,
        ["/tmp"],
    )

    # The ServiceAccount token as the kubelet projects it: a TokenRequest token, the cluster CA and the namespace.
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = control_plane.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )["status"]["token"]
    ca = images.kubeconfig_ca(control_plane.kubeconfig)
    secrets = images.write_service_account_dir(tmp_path / "serviceaccount", token, ca, namespace)
    # The kubelet's Service variables, pointing at the local apiserver; the process shares the host's network, so its
    # ports are free ones rather than the chart's.
    apiserver = urlparse(control_plane.url)
    health_port = free_port()
    env = {
        **pod.env,
        "KUBERNETES_SERVICE_HOST": apiserver.hostname,
        "KUBERNETES_SERVICE_PORT": str(apiserver.port),
        "FINETUNE_HEALTH_PORT": str(health_port),
        "FINETUNE_METRICS_PORT": str(free_port()),
    }
    container = images.Container(operator_image)
    run = images.ContainerRun(
        container,
        images.image_entrypoint(operator_image) + pod.args,
        tmp_path / "operator.log",
        user=pod.user,
        env=env,
        read_only_root=pod.read_only_root,
        drop_all_capabilities=pod.drop_all_capabilities,
        tmpfs=pod.empty_dirs,
        read_only_volumes={images.SERVICE_ACCOUNT_DIR: secrets},
    )
    admin = Kube.connect(str(control_plane.kubeconfig))
    with container, run:
        wait_for(lambda: healthy(health_port), "the operator's /healthz", run)
        admin.create(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "from-image", "namespace": namespace},
                "spec": {
                    "model": {"source": "s3://models/base"},
                    "storage": {"uri": "s3://runs/from-image"},
                    "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}}],
                },
            }
        )
        first = rayjob_name("from-image", "sft", 1)
        rayjob = wait_for(lambda: admin.get(RAYJOB, namespace, first), "the first RayJob", run)
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"] == TRAINER_IMAGE
        status = wait_for(
            lambda: (admin.get(FINETUNEJOB, namespace, "from-image") or {}).get("status", {}).get("stages"),
            "the job's status",
            run,
        )
        assert status[0]["name"] == "sft"

        # KubeRay's side: the RayJob runs, and the operator (watching RayJobs as the chart's ServiceAccount) says so.
        admin.patch(
            RAYJOB,
            namespace,
            first,
            {"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}},
            subresource="status",
        )
        job = wait_for(
            lambda: (j := admin.get(FINETUNEJOB, namespace, "from-image"))["status"].get("phase") == "Running" and j,
            "phase Running",
            run,
        )
        assert job["status"]["stages"][0]["phase"] == "Running"
    assert "Traceback" not in run.output()


def test_the_trainer_image_runs_one_tiny_stage(trainer_container, tmp_path):
    # The stage pods' user owns the work directory, as fsGroup would make it.
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    # The top-level files: what `finetune tiny-model` trains its tokenizer on (held-out sets live in subfolders).
    for source in (REPO_ROOT / "examples" / "data").iterdir():
        if source.is_file():
            (work / "data" / source.name).write_bytes(source.read_bytes())
    for path in [work, *work.rglob("*")]:
        os.chown(path, TRAINER_UID, TRAINER_UID)

    def trainer(*command: str, log: str, timeout: float) -> str:
        env = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        run = trainer_container.run(
            list(command),
            tmp_path / log,
            user=f"{TRAINER_UID}:{TRAINER_UID}",
            env=env,
            volumes={"/work": work},
            workdir="/work",
        )
        with run:
            code = run.wait(timeout=timeout)
        assert code == 0, run.log_tail()
        return run.output()

    # KubeRay starts `ray` and the entrypoint's `python` through a login shell: both must be the image's venv.
    found = trainer("bash", "-lc", "command -v python ray", log="path.log", timeout=60)
    assert found.splitlines()[:2] == ["/opt/venv/bin/python", "/opt/venv/bin/ray"], found
    trainer("finetune", "tiny-model", "/work/models/tiny", "--data-dir", "/work/data", log="tiny.log", timeout=300)
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": "/work/models/tiny"},
            "storage": {"uri": "/work/out"},
            "peft": {"method": "full"},
            "training": {"maxSteps": 10, "batchSize": 8, "maxLength": 64, "learningRate": 3e-3, "loggingSteps": 5},
            "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": "/work/data/instruct.jsonl"}}],
        }
    )
    config = render_stage("image", spec, "sft")
    output = trainer(
        "finetune",
        "stage",
        "--config-json",
        config.model_dump_json(),
        "--report",
        "file:///work/out/report.json",
        "--no-ray",
        log="stage.log",
        timeout=900,
    )
    report = json.loads((work / "out" / "report.json").read_text())
    assert report["phase"] == "Succeeded", output[-3000:]
    assert report["step"] == 10
    assert report["metrics"]["eval_loss_after"] < report["metrics"]["eval_loss_before"]
    assert (work / "out" / "sft" / "model" / "config.json").exists()
    assert Path(report["checkpoint"]).name == "model"
