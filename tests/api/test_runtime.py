"""Runtimes: the merge of a runtime's defaults with a job's fields, and each policy rule, with the field named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from finetune_api.reasons import PERMANENT, Reason
from finetune_api.runtime import LOCKABLE_FIELDS, ClusterFineTuneRuntime, effective_spec, merge
from finetune_api.spec import FineTuneJobSpec

STAGES = [
    {"name": "cpt", "type": "cpt", "dataset": {"uri": "s3://data/corpus.txt"}},
    {"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/chat.jsonl"}},
    {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
]


def job(**fields: Any) -> dict[str, Any]:
    return {
        "runtimeRef": {"kind": "ClusterFineTuneRuntime", "name": "team-a"},
        "stages": copy.deepcopy(STAGES),
        **fields,
    }


def runtime(defaults: dict[str, Any] | None = None, **policy: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ClusterFineTuneRuntime",
        "metadata": {"name": "team-a"},
        "spec": {
            "defaults": {
                "model": {"source": "hf://acme/base-1b", "credentialsSecret": "hf-token"},
                "storage": {"uri": "s3://ckpts/team-a"},
                "resources": {
                    "workers": 2,
                    "gpusPerWorker": 1,
                    "image": "registry.acme.dev/ml/trainer:1.0",
                    "nodeSelector": {"pool": "gpu"},
                    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
                "training": {"learningRate": 0.0001, "batchSize": 4},
                "envFromSecrets": ["wandb"],
                **(defaults or {}),
            },
            "policy": policy,
        },
    }


def problems_of(job_spec: dict[str, Any], runtime_wire: dict[str, Any]) -> list[str]:
    return [str(p) for p in effective_spec(job_spec, runtime_wire)[1]]


def test_merge_rules_objects_by_key_lists_and_scalars_replaced():
    merged = merge(
        {
            "resources": {"workers": 2, "nodeSelector": {"pool": "gpu", "zone": "a"}, "tolerations": [{"key": "x"}]},
            "n": 1,
        },
        {"resources": {"nodeSelector": {"zone": "b"}, "tolerations": []}, "n": 2},
    )
    assert merged == {
        "resources": {"workers": 2, "nodeSelector": {"pool": "gpu", "zone": "b"}, "tolerations": []},
        "n": 2,
    }


def test_a_job_naming_a_runtime_and_its_data_gets_the_runtime_defaults():
    spec, problems = effective_spec(
        job(training={"batchSize": 16}, resources={"nodeSelector": {"zone": "b"}}), runtime()
    )
    assert problems == []
    assert spec.model.source == "hf://acme/base-1b" and spec.model.credentials_secret == "hf-token"
    assert spec.storage.uri == "s3://ckpts/team-a"
    assert (spec.resources.workers, spec.resources.gpus_per_worker) == (2, 1)
    assert spec.resources.node_selector == {"pool": "gpu", "zone": "b"}
    assert spec.resources.tolerations[0].key == "gpu"
    # training merges key by key: the job's batch size, the runtime's learning rate
    assert (spec.training.batch_size, spec.training.learning_rate) == (16, 0.0001)
    assert spec.env_from_secrets == ["wandb"]
    assert [s.name for s in spec.stages] == ["cpt", "sft", "dpo"]


def test_job_lists_replace_the_runtime_lists():
    spec, _ = effective_spec(job(envFromSecrets=["mine"], resources={"tolerations": []}), runtime())
    assert spec.env_from_secrets == ["mine"] and spec.resources.tolerations == []


def test_model_and_storage_are_required_only_without_a_runtime():
    FineTuneJobSpec.model_validate(job())
    with pytest.raises(ValueError, match=r"model\n  Field required"):
        FineTuneJobSpec.model_validate({"stages": STAGES, "storage": {"uri": "s3://ckpts/x"}})
    bare = runtime()
    del bare["spec"]["defaults"]["storage"]
    assert problems_of(job(), bare) == [
        "spec.storage: required: neither the job nor runtime team-a's spec.defaults sets it"
    ]


def test_max_workers_names_the_job_field():
    assert problems_of(job(resources={"workers": 12}), runtime(maxWorkers=8)) == [
        "spec.resources.workers: 12 is more than the runtime's policy.maxWorkers 8"
    ]
    stage_override = job()
    stage_override["stages"][1]["resources"] = {"workers": 9}
    assert problems_of(stage_override, runtime(maxWorkers=8)) == [
        "spec.stages[1].resources.workers: 9 is more than the runtime's policy.maxWorkers 8"
    ]


def test_max_gpus_per_stage_counts_workers_times_gpus():
    assert problems_of(job(resources={"workers": 4, "gpusPerWorker": 4}), runtime(maxGpusPerStage=8)) == [
        "spec.resources.gpusPerWorker: 4 workers × 4 GPUs = 16 is more than the runtime's policy.maxGpusPerStage 8"
    ]
    assert problems_of(job(resources={"workers": 4, "gpusPerWorker": 2}), runtime(maxGpusPerStage=8)) == []


def test_max_active_deadline_requires_and_bounds_the_deadline():
    assert problems_of(job(), runtime(maxActiveDeadlineSeconds=3600)) == [
        "spec.activeDeadlineSeconds: required by the runtime's policy.maxActiveDeadlineSeconds 3600"
    ]
    assert problems_of(job(activeDeadlineSeconds=7200), runtime(maxActiveDeadlineSeconds=3600)) == [
        "spec.activeDeadlineSeconds: 7200 is more than the runtime's policy.maxActiveDeadlineSeconds 3600"
    ]
    with_default = runtime({"activeDeadlineSeconds": 1800}, maxActiveDeadlineSeconds=3600)
    assert problems_of(job(), with_default) == []


def test_allowed_stage_types():
    assert problems_of(job(), runtime(allowedStageTypes=["sft", "cpt"])) == [
        "spec.stages[2].type: dpo is not in the runtime's policy.allowedStageTypes (sft, cpt)"
    ]


def test_allowed_image_prefixes_cover_the_trainer_and_stage_images():
    policy = {"allowedImagePrefixes": ["registry.acme.dev/ml/"]}
    assert problems_of(job(), runtime(**policy)) == []
    stage_image = job()
    stage_image["stages"][0]["resources"] = {"image": "docker.io/evil/trainer:latest"}
    assert problems_of(stage_image, runtime(**policy)) == [
        "spec.stages[0].resources.image: 'docker.io/evil/trainer:latest' does not start with one of the runtime's "
        "policy.allowedImagePrefixes (registry.acme.dev/ml/)"
    ]
    assert problems_of(job(resources={"image": "ghcr.io/x/y:1"}), runtime(**policy))[0].startswith(
        "spec.resources.image: 'ghcr.io/x/y:1' does not start with"
    )


def test_allowed_model_prefixes():
    assert problems_of(job(model={"source": "hf://other/model"}), runtime(allowedModelPrefixes=["hf://acme/"])) == [
        "spec.model.source: 'hf://other/model' does not start with one of the runtime's policy.allowedModelPrefixes "
        "(hf://acme/)"
    ]


def test_locked_fields_at_job_and_stage_level():
    locked = runtime(lockedFields=["resources.nodeSelector", "storage"])
    assert problems_of(job(resources={"workers": 1}), locked) == []
    in_stage = job(storage={"uri": "s3://mine/x"}, resources={"nodeSelector": {"pool": "cheap"}})
    in_stage["stages"][1]["resources"] = {"nodeSelector": {"pool": "cheap"}}
    assert problems_of(in_stage, locked) == [
        "spec.resources.nodeSelector: locked by runtime team-a",
        "spec.storage: locked by runtime team-a",
        "spec.stages[1].resources.nodeSelector: locked by runtime team-a",
    ]


def test_policy_violations_are_permanent_and_say_so():
    (problem,) = effective_spec(job(resources={"workers": 12}), runtime(maxWorkers=8))[1]
    assert problem.reason == Reason.POLICY_VIOLATION and Reason.POLICY_VIOLATION in PERMANENT


def test_an_invalid_merge_is_an_invalid_spec_naming_the_field():
    spec, problems = effective_spec(job(deepspeed={"offloadParams": True}), runtime())
    assert spec is None
    assert [(p.reason, str(p)) for p in problems] == [
        (Reason.INVALID_SPEC, "spec.deepspeed.offloadParams: requires zeroStage 3")
    ]


def test_runtime_is_validated_like_a_spec():
    bad = runtime(maxWorkers=0, lockedFields=["stages"])
    with pytest.raises(ValueError):
        ClusterFineTuneRuntime.model_validate(bad)
    _, problems = effective_spec(job(), bad)
    assert {p.field for p in problems} == {
        "runtime team-a: spec.policy.maxWorkers",
        "runtime team-a: spec.policy.lockedFields[0]",
    }


def test_lockable_fields_are_the_defaultable_spec_fields():
    assert "stages" not in LOCKABLE_FIELDS and "suspend" not in LOCKABLE_FIELDS and "runtimeRef" not in LOCKABLE_FIELDS
    assert {"storage", "resources.nodeSelector", "model.source", "training.learningRate"} <= set(LOCKABLE_FIELDS)


def test_a_runtime_storage_uri_is_a_root_per_job():
    spec, _ = effective_spec(job(), runtime(), "chat-v2", "team-a")
    assert spec.storage.uri == "s3://ckpts/team-a/team-a/chat-v2"
    # A job that sets its own uri keeps it, and merges the rest of the runtime's storage settings.
    shared = runtime({"storage": {"uri": "s3://ckpts/x", "endpointUrl": "http://minio:9000"}})
    own, _ = effective_spec(job(storage={"uri": "s3://mine/run"}), shared, "j", "ns")
    assert (own.storage.uri, own.storage.endpoint_url) == ("s3://mine/run", "http://minio:9000")
