"""End to end: `kubectl apply` the quickstart FineTuneJob, the operator runs every stage with the local executor
(the real trainer, reporting through its ConfigMap with its own ServiceAccount's token), `kubectl wait` for Succeeded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune_dev.testing import REPO_ROOT, OperatorProcess, install_chart_rbac, live_group_members, source_env
from finetune_operator.kube import FINETUNEJOB, Kube

pytestmark = pytest.mark.slow

QUICKSTART = REPO_ROOT / "examples" / "quickstart-k8s.yaml"
DATA = REPO_ROOT / "examples" / "data"
FAST = {"FINETUNE_RETRY_BASE_SECONDS": "2", "FINETUNE_RESYNC_SECONDS": "5", "FINETUNE_LOCAL_POLL_SECONDS": "1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("models") / "tiny"
    env = source_env()
    subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "tiny-model", str(target), "--data-dir", str(DATA)],
        check=True,
        env=env,
        capture_output=True,
    )
    return target


def quickstart(model: Path, storage: Path) -> dict:
    """The example manifest with its relative paths pointed at this test's model and output directories."""
    manifest = yaml.safe_load(QUICKSTART.read_text())
    manifest["spec"]["model"]["source"] = str(model)
    manifest["spec"]["storage"]["uri"] = str(storage)
    sources = [suite for suite in manifest["spec"].get("evaluation", {}).get("suites", [])]
    for stage in manifest["spec"]["stages"]:
        sources += [stage["dataset"]] if "dataset" in stage else stage["datasets"]
    for source in sources:
        for key in ("uri", "validationUri"):
            if key in source:
                source[key] = str(REPO_ROOT / source[key])
    return manifest


@pytest.fixture
def local_operator(control_plane, namespace, tmp_path):
    kubeconfig = install_chart_rbac(control_plane, f"op-{namespace}", namespace, "local", [namespace])
    operator = OperatorProcess(
        kubeconfig, tmp_path / "operator.log", "local", (namespace,), state_dir=tmp_path / "state", env=FAST
    )
    with operator:
        yield operator


def _wait(check, what: str, operator: OperatorProcess, timeout: float):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n--- operator log ---\n{operator.log_tail()}")
        time.sleep(0.5)
    return result


def _running_pid(state: Path, namespace: str, job: str, stage: str) -> int | None:
    pid_file = state / namespace / job / f"{stage}-1" / "pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def test_quickstart_pipeline_survives_an_operator_restart(
    control_plane, namespace, local_operator, tiny_model, tmp_path
):
    storage = tmp_path / "out"
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quickstart(tiny_model, storage)))
    admin = Kube.connect(str(control_plane.kubeconfig))
    state = local_operator.state_dir

    # Kill the operator while the first stage trains; the restarted one must adopt that process, not start another.
    pid = _wait(
        lambda: _running_pid(state, namespace, "quickstart", "cpt"), "the cpt stage process", local_operator, 120
    )
    local_operator.kill()
    time.sleep(2)
    local_operator.start()

    waited = control_plane.kubectl(
        "wait", "--for=condition=Succeeded", "ftj/quickstart", "-n", namespace, "--timeout=900s", check=False
    )
    status = (admin.get(FINETUNEJOB, namespace, "quickstart") or {}).get("status", {})
    assert waited.returncode == 0, (
        f"{waited.stderr}\nstatus: {json.dumps(status, indent=1)}\n{local_operator.log_tail()}"
    )

    stages = {s["name"]: s for s in status["stages"]}
    assert list(stages) == ["cpt", "sft", "reward", "dpo"]
    for name, stage in stages.items():
        assert (stage["phase"], stage["attempts"]) == ("Succeeded", 1), name
        assert Path(stage["checkpoint"]) == storage / name / "model" and (storage / name / "model").is_dir(), name
        assert sorted(
            p.name for p in (state / namespace / "quickstart").iterdir() if p.name.startswith(f"{name}-")
        ) == [f"{name}-1"]
    assert int((state / namespace / "quickstart" / "cpt-1" / "pid").read_text()) == pid
    for name in ("cpt", "sft"):
        metrics = stages[name]["metrics"]
        assert metrics["eval_loss_after"] < metrics["eval_loss_before"], (name, metrics)
    assert stages["reward"]["metrics"]["eval_reward_accuracy"] > 0.5, stages["reward"]["metrics"]
    assert stages["dpo"]["metrics"]["eval_reward_margin"] > 0, stages["dpo"]["metrics"]
    assert status["progress"] == "4/4"


def test_deleting_the_job_mid_stage_stops_the_process_and_cleans_up(
    control_plane, namespace, local_operator, tiny_model, tmp_path
):
    manifest = quickstart(tiny_model, tmp_path / "out")
    manifest["metadata"]["name"] = "doomed"
    manifest["spec"]["stages"] = manifest["spec"]["stages"][:1]
    manifest["spec"]["stages"][0]["training"]["maxSteps"] = 100000
    manifest["spec"]["storage"]["retainOnDelete"] = False
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    state = local_operator.state_dir
    pid = _wait(lambda: _running_pid(state, namespace, "doomed", "cpt"), "the cpt stage process", local_operator, 120)
    # Delete while it trains, once it has written a checkpoint that `retainOnDelete: false` must remove.
    _wait(
        lambda: any((tmp_path / "out" / "cpt").glob("checkpoints/checkpoint-*")),
        "a cpt checkpoint",
        local_operator,
        300,
    )

    control_plane.kubectl("delete", "ftj/doomed", "-n", namespace, "--timeout=60s")
    assert live_group_members(pid) == []
    assert not (state / namespace / "doomed").exists()
    assert not (tmp_path / "out" / "cpt").exists()
    leftovers = control_plane.kubectl(
        "get",
        "configmaps,serviceaccounts,roles,rolebindings",
        "-n",
        namespace,
        "-l",
        "finetune.dev/job=doomed",
        "-o",
        "name",
    ).stdout
    assert leftovers.strip() == ""
