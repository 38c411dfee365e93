"""FineTuneRuntime and ClusterFineTuneRuntime: what a platform team writes so that a user's FineTuneJob names a
runtime and its data, nothing else.

A runtime holds `defaults` (everything under a FineTuneJob's spec except `stages`) and a `policy` the job must keep.
The effective spec is the runtime's defaults merged with the job's own fields:

- objects (`resources`, `training`, `model`, maps such as `resources.nodeSelector`) merge key by key, recursively;
- lists (`resources.tolerations`, `envFromSecrets`) and scalars set by the job replace the runtime's whole.

The merge works on the wire form as written: the CRDs carry no defaults, so a field the user left out is absent on the
cluster too, and the runtime's value applies. `effective_spec` is pure; the operator and `finetune run` both call it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from finetune_api.manifest import ManifestError, describe_error, field_path
from finetune_api.reasons import Reason
from finetune_api.render import join_uri
from finetune_api.spec import (
    COUNT_MAX,
    DNS_SUBDOMAIN,
    DeepSpeedSpec,
    FineTuneJob,
    FineTuneJobSpec,
    ModelSpec,
    PeftSpec,
    ResourcesSpec,
    SecretName,
    SpecModel,
    StageSpec,
    StageType,
    StorageSpec,
    TrainingSpec,
)

RUNTIME_KIND = "FineTuneRuntime"
CLUSTER_RUNTIME_KIND = "ClusterFineTuneRuntime"
RUNTIME_PLURAL = "finetuneruntimes"
CLUSTER_RUNTIME_PLURAL = "clusterfinetuneruntimes"

# Job-level fields a runtime may default. `stages` (the data) is the user's alone; `suspend` belongs to the user and Kueue.
DEFAULTABLE_FIELDS = (
    "model",
    "storage",
    "peft",
    "deepspeed",
    "resources",
    "training",
    "envFromSecrets",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
)
# Stage-level overrides of job-level objects: a locked `resources.nodeSelector` is locked in `stages[].resources` too.
STAGE_OVERRIDES = ("peft", "deepspeed", "resources", "training")


def _lockable_fields() -> tuple[str, ...]:
    """Every defaultable field and, for objects, each of their fields: `storage`, `resources.nodeSelector`, ..."""
    paths: list[str] = []
    for name, field in FineTuneJobSpec.model_fields.items():
        wire = field.alias or name
        if wire not in DEFAULTABLE_FIELDS:
            continue
        paths.append(wire)
        model = next(
            (t for t in getattr(field.annotation, "__args__", (field.annotation,)) if isinstance(t, type)), None
        )
        if model is not None and issubclass(model, BaseModel):
            paths += [f"{wire}.{sub.alias or sub_name}" for sub_name, sub in model.model_fields.items()]
    return tuple(paths)


LOCKABLE_FIELDS = _lockable_fields()
LockableField = Literal[LOCKABLE_FIELDS]  # type: ignore[valid-type]
Prefix = Annotated[str, Field(min_length=1, max_length=2048)]

_MERGE_NOTE = "Merged with the job's own value: objects key by key, a list or scalar set by the job replaces this."


class RuntimeDefaults(SpecModel):
    """What a job gets for every field it leaves out. The same fields, bounds and meaning as in a FineTuneJob's spec."""

    model: ModelSpec | None = Field(default=None, description=f"Default `spec.model`. {_MERGE_NOTE}")
    storage: StorageSpec | None = Field(
        default=None,
        description=(
            f"Default `spec.storage`. {_MERGE_NOTE} Its `uri` is a root shared by the runtime's jobs: a job that sets "
            "no `storage.uri` of its own writes under `<uri>/<namespace>/<job name>/`."
        ),
    )
    peft: PeftSpec | None = Field(default=None, description=f"Default `spec.peft`. {_MERGE_NOTE}")
    deepspeed: DeepSpeedSpec | None = Field(default=None, description=f"Default `spec.deepspeed`. {_MERGE_NOTE}")
    resources: ResourcesSpec | None = Field(
        default=None,
        description=f"Default `spec.resources` (image, GPUs, node selector, tolerations, pull secrets). {_MERGE_NOTE}",
    )
    training: TrainingSpec | None = Field(default=None, description=f"Default `spec.training`. {_MERGE_NOTE}")
    env_from_secrets: list[SecretName] | None = Field(
        default=None, max_length=32, description=f"Default `spec.envFromSecrets`. {_MERGE_NOTE}"
    )
    backoff_limit: int | None = Field(default=None, ge=0, le=100, description="Default `spec.backoffLimit`.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=COUNT_MAX, description="Default `spec.activeDeadlineSeconds`."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=COUNT_MAX, description="Default `spec.ttlSecondsAfterFinished`."
    )


class RuntimePolicy(SpecModel):
    """What a job using the runtime must keep. Checked on the effective spec (runtime defaults merged with the job),
    at admission and again by the operator before the first stage starts."""

    max_workers: int | None = Field(
        default=None, ge=1, le=1024, description="Most Ray workers a stage may use (`resources.workers`)."
    )
    max_gpus_per_stage: int | None = Field(
        default=None,
        ge=0,
        le=16384,
        description="Most GPUs a stage may use: `resources.workers` × `resources.gpusPerWorker`.",
    )
    max_active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=COUNT_MAX,
        description="Most `activeDeadlineSeconds` a job may ask for; with this set, the job (or the runtime's defaults) must set one.",
    )
    allowed_stage_types: list[Annotated[StageType, Strict(False)]] | None = Field(
        default=None, max_length=8, description="Stage types a job may run; unset allows every type."
    )
    allowed_image_prefixes: list[Prefix] | None = Field(
        default=None,
        max_length=32,
        description=(
            "The trainer image (`resources.image`) and every stage's image must start with one of these, e.g. "
            "`registry.example.com/ml/`. A job that sets no image runs the operator's configured trainer image."
        ),
    )
    allowed_model_prefixes: list[Prefix] | None = Field(
        default=None,
        max_length=32,
        description="`model.source` must start with one of these, e.g. `hf://meta-llama/` or `s3://models/`.",
    )
    locked_fields: list[LockableField] | None = Field(
        default=None,
        max_length=len(LOCKABLE_FIELDS),
        description=(
            "Fields a job may not set (camelCase paths such as `resources.nodeSelector` or `storage`); the runtime's "
            "defaults apply. A locked field under `resources`, `training`, `peft` or `deepspeed` is locked in each "
            "stage's overrides too."
        ),
    )


class FineTuneRuntimeSpec(SpecModel):
    defaults: RuntimeDefaults = Field(
        default_factory=RuntimeDefaults,
        description="Defaults for every field of a FineTuneJob's spec except `stages`.",
    )
    policy: RuntimePolicy = Field(default_factory=RuntimePolicy, description="Limits and rules a job must keep.")
    queue_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=DNS_SUBDOMAIN,
        description=(
            "Kueue LocalQueue (in the job's namespace) for the stages of every job using this runtime: their RayJobs "
            "get the label `kueue.x-k8s.io/queue-name` with this value, in place of any the job carries. With one "
            "LocalQueue per team namespace pointing at the team's ClusterQueue, each team gets its GPU quota."
        ),
    )


class RuntimeMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
    namespace: str | None = None


class FineTuneRuntime(SpecModel):
    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion", description="finetune.dev/v1alpha1")
    kind: Literal["FineTuneRuntime"] = Field(description=RUNTIME_KIND)
    metadata: RuntimeMeta
    spec: FineTuneRuntimeSpec = Field(default_factory=FineTuneRuntimeSpec)


class ClusterFineTuneRuntime(SpecModel):
    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion", description="finetune.dev/v1alpha1")
    kind: Literal["ClusterFineTuneRuntime"] = Field(description=CLUSTER_RUNTIME_KIND)
    metadata: RuntimeMeta
    spec: FineTuneRuntimeSpec = Field(default_factory=FineTuneRuntimeSpec)

    @model_validator(mode="after")
    def _cluster_scoped(self) -> ClusterFineTuneRuntime:
        if self.metadata.namespace:
            raise ValueError("metadata.namespace: a ClusterFineTuneRuntime is cluster-scoped and has no namespace")
        return self


@dataclass(frozen=True)
class Problem:
    """One reason the job cannot run with the runtime: the job's field, what is wrong, and the condition reason."""

    field: str
    message: str
    reason: str = Reason.POLICY_VIOLATION

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def merge(defaults: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """`defaults` ⊕ `job`: objects merge key by key (recursively); a list or scalar from `job` replaces the default."""
    out = copy.deepcopy(defaults)
    for key, value in job.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _has(wire: dict[str, Any], path: str) -> bool:
    node: Any = wire
    for part in path.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return False
        node = node[part]
    return True


def locked_problems(job_spec_wire: dict[str, Any], locked: list[str], runtime_name: str) -> list[Problem]:
    problems = [
        Problem(f"spec.{path}", f"locked by runtime {runtime_name}") for path in locked if _has(job_spec_wire, path)
    ]
    for index, stage in enumerate(job_spec_wire.get("stages") or []):
        if not isinstance(stage, dict):
            continue
        problems += [
            Problem(f"spec.stages[{index}].{path}", f"locked by runtime {runtime_name}")
            for path in locked
            if path.split(".")[0] in STAGE_OVERRIDES and _has(stage, path)
        ]
    return problems


def _prefixed(value: str, prefixes: list[str]) -> bool:
    return any(value.startswith(prefix) for prefix in prefixes)


def policy_problems(spec: FineTuneJobSpec, policy: RuntimePolicy) -> list[Problem]:
    """The limits and allow-lists, checked on the effective spec; each problem names where the value came from."""
    problems: list[Problem] = []
    for index, stage in enumerate(spec.stages):
        resources, where = _stage_resources(spec, stage, index)
        if policy.max_workers is not None and resources.workers > policy.max_workers:
            problems.append(
                Problem(
                    f"{where}.workers",
                    f"{resources.workers} is more than the runtime's policy.maxWorkers {policy.max_workers}",
                )
            )
        gpus = resources.workers * resources.gpus_per_worker
        if policy.max_gpus_per_stage is not None and gpus > policy.max_gpus_per_stage:
            problems.append(
                Problem(
                    f"{where}.gpusPerWorker",
                    f"{resources.workers} workers × {resources.gpus_per_worker} GPUs = {gpus} is more than the "
                    f"runtime's policy.maxGpusPerStage {policy.max_gpus_per_stage}",
                )
            )
        if policy.allowed_image_prefixes is not None and resources.image is not None:
            if not _prefixed(resources.image, policy.allowed_image_prefixes):
                problems.append(
                    Problem(
                        f"{where}.image",
                        f"{resources.image!r} does not start with one of the runtime's policy.allowedImagePrefixes "
                        f"({', '.join(policy.allowed_image_prefixes)})",
                    )
                )
        if policy.allowed_stage_types is not None and stage.type not in policy.allowed_stage_types:
            problems.append(
                Problem(
                    f"spec.stages[{index}].type",
                    f"{stage.type} is not in the runtime's policy.allowedStageTypes "
                    f"({', '.join(policy.allowed_stage_types)})",
                )
            )
    # Several stages sharing spec.resources would repeat the same problem.
    problems = list(dict.fromkeys(problems))
    limit = policy.max_active_deadline_seconds
    if limit is not None:
        if spec.active_deadline_seconds is None:
            problems.append(
                Problem(
                    "spec.activeDeadlineSeconds",
                    f"required by the runtime's policy.maxActiveDeadlineSeconds {limit}",
                )
            )
        elif spec.active_deadline_seconds > limit:
            problems.append(
                Problem(
                    "spec.activeDeadlineSeconds",
                    f"{spec.active_deadline_seconds} is more than the runtime's policy.maxActiveDeadlineSeconds {limit}",
                )
            )
    prefixes = policy.allowed_model_prefixes
    if prefixes is not None and spec.model is not None and not _prefixed(spec.model.source, prefixes):
        problems.append(
            Problem(
                "spec.model.source",
                f"{spec.model.source!r} does not start with one of the runtime's policy.allowedModelPrefixes "
                f"({', '.join(prefixes)})",
            )
        )
    return problems


def _stage_resources(spec: FineTuneJobSpec, stage: StageSpec, index: int) -> tuple[ResourcesSpec, str]:
    """A stage's resources (its own replace the job's whole, as rendering does) and the field a problem names."""
    if stage.resources is not None:
        return stage.resources, f"spec.stages[{index}].resources"
    return spec.resources, "spec.resources"


def validation_problems(exc: ValidationError, prefix: list[str | int], reason: str) -> list[Problem]:
    problems = []
    for loc, message in map(describe_error, exc.errors()):
        problems.append(Problem(field_path([*prefix, *loc]), message, reason))
    return problems


def parse_runtime(
    runtime_wire: dict[str, Any],
) -> tuple[FineTuneRuntime | ClusterFineTuneRuntime | None, list[Problem]]:
    model = ClusterFineTuneRuntime if runtime_wire.get("kind") == CLUSTER_RUNTIME_KIND else FineTuneRuntime
    try:
        return model.model_validate(runtime_wire), []
    except ValidationError as exc:
        name = (runtime_wire.get("metadata") or {}).get("name", "?")
        return None, [
            Problem(f"runtime {name}: {p.field}", p.message, Reason.INVALID_SPEC)
            for p in validation_problems(exc, [], Reason.INVALID_SPEC)
        ]


def effective_spec(
    job_spec_wire: dict[str, Any], runtime_wire: dict[str, Any], job_name: str = "", namespace: str = ""
) -> tuple[FineTuneJobSpec | None, list[Problem]]:
    """The job's spec with the runtime's defaults filled in, checked against the runtime's policy.

    Returns (spec, []) when the job may run, else (spec or None, problems): the spec is None when the merged result is
    not a valid FineTuneJobSpec. Problems name the job's field (`spec.resources.workers: 12 is more than ...`)."""
    runtime, problems = parse_runtime(runtime_wire)
    if runtime is None:
        return None, problems
    name = runtime.metadata.name
    defaults = runtime.spec.defaults.to_wire()
    policy = runtime.spec.policy
    problems = locked_problems(job_spec_wire, policy.locked_fields or [], name)
    merged = merge(defaults, job_spec_wire)
    if "uri" in defaults.get("storage", {}) and not _has(job_spec_wire, "storage.uri") and job_name:
        # Jobs sharing a runtime must not share stage directories.
        merged["storage"]["uri"] = join_uri(defaults["storage"]["uri"], *filter(None, (namespace, job_name)))
    for required in ("model", "storage"):
        if merged.get(required) is None:
            problems.append(
                Problem(
                    f"spec.{required}",
                    f"required: neither the job nor runtime {name}'s spec.defaults sets it",
                    Reason.INVALID_SPEC,
                )
            )
    if any(p.reason == Reason.INVALID_SPEC for p in problems):
        return None, problems
    try:
        spec = FineTuneJobSpec.model_validate(merged)
    except ValidationError as exc:
        return None, problems + validation_problems(exc, ["spec"], Reason.INVALID_SPEC)
    return spec, problems + policy_problems(spec, policy)


def with_runtime(job: FineTuneJob, source: str, runtime_path: str | None) -> FineTuneJob:
    """The job with the runtime its spec.runtimeRef names merged in and its policy checked, as the operator does."""
    ref = job.spec.runtime_ref
    if runtime_path is None:
        if ref is None:
            return job
        raise ManifestError(source, [f"spec.runtimeRef: names {ref.kind} {ref.name}: pass its manifest with --runtime"])
    if ref is None:
        raise ManifestError(source, ["spec.runtimeRef: not set, so --runtime has nothing to apply to"])
    try:
        documents = [d for d in yaml.safe_load_all(Path(runtime_path).read_text()) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(runtime_path, [f"cannot read the runtime: {exc}"]) from exc
    named = [
        d
        for d in documents
        if isinstance(d, dict) and d.get("kind") == ref.kind and (d.get("metadata") or {}).get("name") == ref.name
    ]
    if not named:
        raise ManifestError(
            runtime_path, [f"no {ref.kind} named {ref.name!r} (the job's spec.runtimeRef) in this file"]
        )
    written = job.spec.model_dump(by_alias=True, exclude_unset=True, mode="json")
    spec, problems = effective_spec(written, named[0], job.metadata.name, job.metadata.namespace or "")
    if problems:
        raise ManifestError(source, [str(problem) for problem in problems])
    # The merged spec needs no runtime any more: the local run is then an ordinary job.
    return job.model_copy(update={"spec": spec.model_copy(update={"runtime_ref": None})})
