"""End to end with a runtime: the self-serve example (a runtime name and three datasets) runs through the operator
with the local executor; the runtime's defaults reach the trainer, and the merged spec is in status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_e2e_local
import yaml

from finetune_dev.testing import REPO_ROOT
from finetune_operator.kube import FINETUNEJOB, Kube

pytestmark = pytest.mark.slow

EXAMPLE = REPO_ROOT / "examples" / "self-serve"
# The quickstart end-to-end test's namespace-scoped local-executor operator and tiny model.
local_operator, tiny_model = test_e2e_local.local_operator, test_e2e_local.tiny_model


def test_the_self_serve_example_runs_through_the_operator(
    control_plane, namespace, local_operator, tiny_model, tmp_path
):
    # The namespace-scoped operator of this test reads FineTuneRuntimes of its namespace: the example's runtime as one.
    runtime = yaml.safe_load((EXAMPLE / "runtime.yaml").read_text())
    runtime["kind"] = "FineTuneRuntime"
    runtime["spec"]["defaults"]["model"]["source"] = str(tiny_model)
    runtime["spec"]["policy"]["allowedModelPrefixes"] = [str(tiny_model.parent)]
    runtime["spec"]["defaults"]["storage"]["uri"] = str(tmp_path / "runs")
    job = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    job["spec"]["runtimeRef"]["kind"] = "FineTuneRuntime"
    for stage in job["spec"]["stages"]:
        stage["dataset"]["uri"] = str(REPO_ROOT / stage["dataset"]["uri"])
    for manifest in (runtime, job):
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))

    waited = control_plane.kubectl(
        "wait", "--for=condition=Succeeded", "ftj/self-serve", "-n", namespace, "--timeout=900s", check=False
    )
    status = (Kube.connect(str(control_plane.kubeconfig)).get(FINETUNEJOB, namespace, "self-serve") or {})["status"]
    assert waited.returncode == 0, (
        f"{waited.stderr}\nstatus: {json.dumps(status, indent=1)}\n{local_operator.log_tail()}"
    )
    root = tmp_path / "runs" / namespace / "self-serve"
    for stage in status["stages"]:
        assert stage["phase"] == "Succeeded" and Path(stage["checkpoint"]) == root / stage["name"] / "model"
        # The runtime's maxSteps reached the trainer.
        assert stage["progress"]["totalSteps"] == 40, stage
    effective = status["effectiveSpec"]
    assert effective["model"]["source"] == str(tiny_model) and effective["resources"]["workers"] == 2
    assert status["runtime"]["kind"] == "FineTuneRuntime" and status["runtime"]["name"] == "cpu-tiny"
