"""`finetune run job.yaml --runtime runtime.yaml`: the operator's merge and policy, applied before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_api.manifest import ManifestError, load_manifest
from finetune_api.runtime import with_runtime
from finetune_trainer.pipeline import run_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "self-serve"
JOB, RUNTIME = EXAMPLE / "job.yaml", EXAMPLE / "runtime.yaml"


def test_the_self_serve_example_merges_into_the_quickstart_settings():
    job = with_runtime(load_manifest(JOB), str(JOB), str(RUNTIME))
    spec = job.spec
    assert spec.runtime_ref is None
    assert (spec.model.source, spec.storage.uri) == ("./models/tiny", "./out/self-serve/self-serve")
    assert (spec.resources.workers, spec.deepspeed.zero_stage, spec.peft.method) == (2, 2, "full")
    assert [s.dataset.uri for s in spec.stages] == [
        "examples/data/domain.txt",
        "examples/data/instruct.jsonl",
        "examples/data/prefs.jsonl",
    ]
    assert spec.training.max_steps == 40 and spec.active_deadline_seconds == 3600


def test_a_job_naming_a_runtime_needs_it(capsys):
    with pytest.raises(
        ManifestError, match="spec.runtimeRef: names ClusterFineTuneRuntime cpu-tiny: pass its manifest"
    ):
        with_runtime(load_manifest(JOB), str(JOB), None)
    assert run_manifest(str(JOB), None, use_ray=False) == 2
    assert "--runtime" in capsys.readouterr().err


def test_a_policy_violation_is_refused_naming_the_field(tmp_path: Path):
    manifest = yaml.safe_load(JOB.read_text())
    manifest["spec"]["resources"] = {"workers": 4, "image": "docker.io/x/y:1"}
    manifest["spec"]["stages"].append({"name": "ppo", "type": "ppo", "rewardFrom": "rm", "dataset": {"uri": "p.jsonl"}})
    manifest["spec"]["stages"].insert(2, {"name": "rm", "type": "reward", "dataset": {"uri": "p.jsonl"}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError) as raised:
        with_runtime(load_manifest(path), str(path), str(RUNTIME))
    assert raised.value.problems == [
        "spec.resources.image: locked by runtime cpu-tiny",
        "spec.resources.workers: 4 is more than the runtime's policy.maxWorkers 2",
        "spec.stages[2].type: reward is not in the runtime's policy.allowedStageTypes (cpt, sft, dpo)",
        "spec.stages[4].type: ppo is not in the runtime's policy.allowedStageTypes (cpt, sft, dpo)",
    ]


def test_the_runtime_file_must_hold_the_named_runtime(tmp_path: Path):
    other = tmp_path / "runtime.yaml"
    other.write_text(RUNTIME.read_text().replace("name: cpu-tiny", "name: other"))
    with pytest.raises(ManifestError, match="no ClusterFineTuneRuntime named 'cpu-tiny'"):
        with_runtime(load_manifest(JOB), str(JOB), str(other))
