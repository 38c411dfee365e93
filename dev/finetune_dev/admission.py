"""The runtime policy as ValidatingAdmissionPolicies: a FineTuneJob that breaks its runtime's policy is refused at
create time, with the field named. Generated from the contract (`finetune_api.runtime`) by `crdgen` into the chart.

One policy per runtime kind (a policy has one `paramKind`). Its binding's `paramRef` selects every runtime (of the
job's namespace, for FineTuneRuntime), so each validation is evaluated once per runtime: it applies only where the
runtime is the one the job names (`variables.applies`). With no runtime at all, `parameterNotFoundAction: Allow` lets
the job in; the operator then waits for its runtime (RuntimeNotFound). The operator checks the same rules again in
Python (`finetune_api.runtime.effective_spec`) before the first stage starts: this is the early refusal, not the only one.

Values are the effective ones, as the operator computes them: the job's field, else the runtime's default, else the
model's default; a stage's own `resources` replace the job's whole.
"""

from __future__ import annotations

from typing import Any

from finetune_api.runtime import CLUSTER_RUNTIME_KIND, LOCKABLE_FIELDS, RUNTIME_KIND, STAGE_OVERRIDES
from finetune_api.spec import GROUP, PLURAL, VERSION, ResourcesSpec

POLICY_SUFFIXES = {
    RUNTIME_KIND: "runtime-policy",
    CLUSTER_RUNTIME_KIND: "cluster-runtime-policy",
}


def _has(root: str, path: str) -> str:
    """`has(a.b) && has(a.b.c)` for `root` and a dotted field path."""
    parts = path.split(".")
    return " && ".join(f"has({root}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def _effective(path: str, fallback: str) -> str:
    """The job's value of `spec.<path>`, else the runtime's default, else `fallback`."""
    return (
        f"({_has('object.spec', path)} ? object.spec.{path} : "
        f"({_has('params', 'spec.defaults.' + path)} ? params.spec.defaults.{path} : {fallback}))"
    )


def _policy(field: str) -> str:
    return _has("params", f"spec.policy.{field}")


def _stage_resource(field: str, fallback: str) -> str:
    return f"(has(s.resources.{field}) ? s.resources.{field} : {fallback})"


def _rule(expression: str, message: str) -> dict[str, str]:
    return {"expression": f"!variables.applies || {expression}", "messageExpression": message}


def _variables() -> list[dict[str, str]]:
    default_workers = ResourcesSpec.model_fields["workers"].default
    default_gpus = ResourcesSpec.model_fields["gpus_per_worker"].default
    set_fields = ", ".join(f"{_has('object.spec', path)} ? '{path}' : ''" for path in LOCKABLE_FIELDS)
    stage_paths = [path for path in LOCKABLE_FIELDS if path.split(".")[0] in STAGE_OVERRIDES]
    stage_set_fields = ", ".join(
        f"object.spec.stages.exists(s, {_has('s', path)}) ? '{path}' : ''" for path in stage_paths
    )
    locked = "params.spec.policy.lockedFields"
    return [
        {"name": "applies", "expression": "object.spec.runtimeRef.name == params.metadata.name"},
        {"name": "workers", "expression": _effective("resources.workers", str(default_workers))},
        {"name": "gpusPerWorker", "expression": _effective("resources.gpusPerWorker", str(default_gpus))},
        {"name": "image", "expression": _effective("resources.image", "''")},
        {"name": "modelSource", "expression": _effective("model.source", "''")},
        {"name": "deadline", "expression": _effective("activeDeadlineSeconds", "0")},
        {
            "name": "locked",
            "expression": f"[{set_fields}].filter(p, p != '' && {_policy('lockedFields')} && p in {locked})",
        },
        {
            "name": "lockedInStages",
            "expression": f"[{stage_set_fields}].filter(p, p != '' && {_policy('lockedFields')} && p in {locked})",
        },
    ]


def _validations() -> list[dict[str, str]]:
    policy = "params.spec.policy"
    stage_workers = _stage_resource("workers", str(ResourcesSpec.model_fields["workers"].default))
    stage_gpus = _stage_resource("gpusPerWorker", str(ResourcesSpec.model_fields["gpus_per_worker"].default))
    stage_image = "(has(s.resources.image) ? s.resources.image : '')"
    images = f"{policy}.allowedImagePrefixes"
    return [
        _rule(
            "variables.locked.size() == 0",
            "variables.locked.map(p, 'spec.' + p).join(', ') + ': locked by runtime ' + params.metadata.name",
        ),
        _rule(
            "variables.lockedInStages.size() == 0",
            "variables.lockedInStages.map(p, 'spec.stages[].' + p).join(', ') + ': locked by runtime ' "
            "+ params.metadata.name",
        ),
        _rule(
            f"!({_policy('maxWorkers')}) || variables.workers <= {policy}.maxWorkers",
            f"'spec.resources.workers: ' + string(variables.workers) + ' is more than the runtime\\'s "
            f"policy.maxWorkers ' + string({policy}.maxWorkers)",
        ),
        _rule(
            f"!({_policy('maxWorkers')}) || object.spec.stages.all(s, !has(s.resources) || {stage_workers} <= "
            f"{policy}.maxWorkers)",
            f"'spec.stages[].resources.workers: a stage asks for more than the runtime\\'s policy.maxWorkers ' + "
            f"string({policy}.maxWorkers)",
        ),
        _rule(
            f"!({_policy('maxGpusPerStage')}) || variables.workers * variables.gpusPerWorker <= "
            f"{policy}.maxGpusPerStage",
            f"'spec.resources.gpusPerWorker: ' + string(variables.workers) + ' workers × ' + "
            f"string(variables.gpusPerWorker) + ' GPUs = ' + string(variables.workers * variables.gpusPerWorker) + "
            f"' is more than the runtime\\'s policy.maxGpusPerStage ' + string({policy}.maxGpusPerStage)",
        ),
        _rule(
            f"!({_policy('maxGpusPerStage')}) || object.spec.stages.all(s, !has(s.resources) || "
            f"{stage_workers} * {stage_gpus} <= {policy}.maxGpusPerStage)",
            f"'spec.stages[].resources.gpusPerWorker: a stage asks for more GPUs than the runtime\\'s "
            f"policy.maxGpusPerStage ' + string({policy}.maxGpusPerStage)",
        ),
        _rule(
            f"!({_policy('maxActiveDeadlineSeconds')}) || "
            f"(variables.deadline > 0 && variables.deadline <= {policy}.maxActiveDeadlineSeconds)",
            f"variables.deadline == 0 ? 'spec.activeDeadlineSeconds: required by the runtime\\'s "
            f"policy.maxActiveDeadlineSeconds ' + string({policy}.maxActiveDeadlineSeconds) : "
            f"'spec.activeDeadlineSeconds: ' + string(variables.deadline) + ' is more than the runtime\\'s "
            f"policy.maxActiveDeadlineSeconds ' + string({policy}.maxActiveDeadlineSeconds)",
        ),
        _rule(
            f"!({_policy('allowedStageTypes')}) || object.spec.stages.all(s, s.type in {policy}.allowedStageTypes)",
            f"'spec.stages[].type: ' + object.spec.stages.filter(s, !(s.type in {policy}.allowedStageTypes))"
            f".map(s, s.type).join(', ') + ' not in the runtime\\'s policy.allowedStageTypes (' + "
            f"{policy}.allowedStageTypes.join(', ') + ')'",
        ),
        _rule(
            f"!({_policy('allowedImagePrefixes')}) || variables.image == '' || "
            f"{images}.exists(p, variables.image.startsWith(p))",
            f"'spec.resources.image: ' + variables.image + ' does not start with one of the runtime\\'s "
            f"policy.allowedImagePrefixes (' + {images}.join(', ') + ')'",
        ),
        _rule(
            f"!({_policy('allowedImagePrefixes')}) || object.spec.stages.all(s, !has(s.resources) || "
            f"{stage_image} == '' || {images}.exists(p, {stage_image}.startsWith(p)))",
            f"'spec.stages[].resources.image: a stage image does not start with one of the runtime\\'s "
            f"policy.allowedImagePrefixes (' + {images}.join(', ') + ')'",
        ),
        _rule(
            f"!({_policy('allowedModelPrefixes')}) || variables.modelSource == '' || "
            f"{policy}.allowedModelPrefixes.exists(p, variables.modelSource.startsWith(p))",
            f"'spec.model.source: ' + variables.modelSource + ' does not start with one of the runtime\\'s "
            f"policy.allowedModelPrefixes (' + {policy}.allowedModelPrefixes.join(', ') + ')'",
        ),
    ]


def admission_policies(prefix: str) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy and its binding for each runtime kind, named `<prefix>-<kind>-policy`."""
    documents: list[dict[str, Any]] = []
    for kind in (RUNTIME_KIND, CLUSTER_RUNTIME_KIND):
        name = f"{prefix}-{POLICY_SUFFIXES[kind]}"
        documents.append(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {
                    "failurePolicy": "Fail",
                    "paramKind": {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind},
                    "matchConstraints": {
                        "resourceRules": [
                            {
                                "apiGroups": [GROUP],
                                "apiVersions": [VERSION],
                                "operations": ["CREATE", "UPDATE"],
                                "resources": [PLURAL],
                            }
                        ]
                    },
                    "matchConditions": [
                        {
                            "name": "names-a-" + kind.lower(),
                            "expression": f"has(object.spec.runtimeRef) && object.spec.runtimeRef.kind == '{kind}'",
                        },
                        {
                            # A started job runs its recorded effective spec; later edits (suspend) are not re-judged.
                            "name": "not-started",
                            "expression": "!has(object.status) || !has(object.status.startTime)",
                        },
                    ],
                    "variables": _variables(),
                    "validations": _validations(),
                },
            }
        )
        documents.append(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name},
                "spec": {
                    "policyName": name,
                    "validationActions": ["Deny"],
                    # Every runtime (of the job's namespace, for the namespaced kind); the rules pick the named one.
                    "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
                },
            }
        )
    return documents
