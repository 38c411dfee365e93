"""Spec -> rendered stage config: the one-way flow from a FineTuneJob to what one trainer process runs.

The operator renders a StageConfig per stage attempt and hands it to the trainer entrypoint; `finetune run` does the same
locally. The trainer never reads the FineTuneJob itself.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from pydantic import ConfigDict, Field

from finetune_api.spec import (
    TRAINING_DEFAULTS,
    ApiModel,
    DeepSpeedSpec,
    EvaluationSuite,
    FineTuneJobSpec,
    ModelSpec,
    PeftSpec,
    ResourcesSpec,
    StageSpec,
    StageType,
    StorageSpec,
    TrainingSpec,
    uri_scheme,
)

# Where the trainer pods mount `pvc://<claim>/...` volumes; `pvc://claim/a/b` is read as `<root>/claim/a/b`.
PVC_MOUNT_ROOT = "/mnt/pvc"

# Learning-rate defaults by (stage type, full vs adapter training), from TRL's and OpenRLHF's defaults.
_DEFAULT_LR = {
    ("cpt", "full"): 2e-5,
    ("cpt", "adapter"): 2e-4,
    ("sft", "full"): 2e-5,
    ("sft", "adapter"): 2e-4,
    ("reward", "full"): 1e-5,
    ("reward", "adapter"): 1e-4,
    ("dpo", "full"): 1e-6,
    ("dpo", "adapter"): 5e-6,
    ("kto", "full"): 1e-6,
    ("kto", "adapter"): 5e-6,
    ("orpo", "full"): 8e-6,
    ("orpo", "adapter"): 5e-5,
    ("ppo", "full"): 3e-6,
    ("ppo", "adapter"): 1e-5,
    ("grpo", "full"): 1e-6,
    ("grpo", "adapter"): 1e-5,
}


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an `s3://`/`pvc://` URI."""
    scheme = uri_scheme(base)
    if scheme in ("s3", "pvc"):
        return posixpath.join(base.rstrip("/"), *parts)
    return posixpath.join(base, *parts)


# What a stage writes under `<storage.uri>/<stage name>/`; nothing else there is the job's.
STAGE_MODEL_DIR = "model"
STAGE_CHECKPOINTS_DIR = "checkpoints"
# The stage's curves (one JSON line per logged step) and, with training.reportTo: [tensorboard], its event files.
STAGE_HISTORY_FILE = "metrics.jsonl"
STAGE_TENSORBOARD_DIR = "tensorboard"
# Everything the trainer writes under `<storage>/<stage>/`: what `retainOnDelete: false` removes.
STAGE_OUTPUTS = (STAGE_CHECKPOINTS_DIR, STAGE_MODEL_DIR, STAGE_HISTORY_FILE, STAGE_TENSORBOARD_DIR)


def stage_root(storage: StorageSpec, stage_name: str) -> str:
    return join_uri(storage.uri, stage_name)


def stage_output_uri(storage: StorageSpec, stage_name: str) -> str:
    """The stage's final model (merged when trained with adapters): the next stage's input."""
    return join_uri(storage.uri, stage_name, STAGE_MODEL_DIR)


def stage_checkpoint_dir(storage: StorageSpec, stage_name: str) -> str:
    """Resumable checkpoints (`checkpoint-<step>`) written while the stage runs."""
    return join_uri(storage.uri, stage_name, STAGE_CHECKPOINTS_DIR)


# KubeRay v1.5.1 refuses RayJob names longer than 47 characters (MaxRayJobNameLength = MaxRayClusterNameLength - 6, in
# ray-operator/controllers/ray/utils/constant.go) or not DNS-1035 labels (ValidateRayJobMetadata, utils/validation.go):
# it appends 6 characters to make the RayCluster name, and Service names must stay within 63.
RAYJOB_NAME_MAX = 47
_DIGEST_CHARS = 8


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:_DIGEST_CHARS]


def rayjob_name(job_name: str, stage_name: str, attempt: int) -> str:
    """The RayJob of one (job, stage, attempt): a DNS-1035 label of at most 47 characters, deterministic so that
    creates are idempotent.

    `<job>-<stage>` (cut to fit) keeps it readable; the digest of (job, stage, attempt) keeps it unique where the cut
    or a dash inside a name (job `a-b` stage `c` vs job `a` stage `b-c`) would make two children look alike.
    """
    tail = f"-{attempt}-{_digest(job_name, stage_name, str(attempt))}"
    # DNS-1035 starts with a letter; job names are DNS-1123 labels and may start with a digit (`2026-run`).
    job_part = job_name if job_name[0].isalpha() else "r" + job_name
    room = RAYJOB_NAME_MAX - len(tail)
    # The job's name gives way first, so the stage stays readable (stage names have at most 30 characters).
    job_part = job_part[: max(room - len(stage_name) - 1, 8)].rstrip("-")
    return f"{job_part}-{stage_name}"[:room].rstrip("-") + tail


def stage_configmap_name(job_name: str, stage_name: str) -> str:
    """The per-stage ConfigMap: the current attempt's StageConfig in, the trainer's StageReport out.

    ConfigMap names are DNS-1123 subdomains (up to 253 characters): the dots, which job and stage names (DNS labels)
    cannot contain, keep the name unique and readable without cutting (at most 63 + 30 + 7 characters).
    """
    return f"{job_name}.{stage_name}.stage"


# The config travels in the stage's ConfigMap, whose data the API server limits to 1 MiB (corev1 MaxSecretSize); the
# rest is left for the object's metadata and the trainer's report.
STAGE_CONFIG_MAX_BYTES = 1024 * 1024 - 64 * 1024


def stage_config_json(config: StageConfig) -> str:
    """The StageConfig as the trainer reads it (`--config-file`): compact, keys sorted."""
    return json.dumps(config.to_wire(), separators=(",", ":"), sort_keys=True)


def resolve_training(job: FineTuneJobSpec, stage: StageSpec) -> TrainingSpec:
    """Defaults < spec.training < stage.training, field by field."""
    merged = TRAINING_DEFAULTS.model_dump()
    for layer in (job.training, stage.training):
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True))
    peft = stage.peft or job.peft
    if merged.get("learning_rate") is None:
        merged["learning_rate"] = _DEFAULT_LR[(stage.type, "full" if peft.method == "full" else "adapter")]
    return TrainingSpec(**merged)


class StageConfig(ApiModel):
    """Everything one stage attempt needs, fully resolved and frozen."""

    model_config = ConfigDict(frozen=True)

    job_name: str = Field(description="The FineTuneJob's name.")
    namespace: str | None = Field(default=None, description="The FineTuneJob's namespace (None when run locally).")
    stage_index: int = Field(description="Position of the stage in the pipeline (0-based).")
    stage: StageSpec = Field(description="The stage as written, with per-stage overrides.")
    model: ModelSpec = Field(description="The job's base model settings (tokenizer, chat template, credentials).")
    input_model: str = Field(
        description="Model this stage starts from: the latest earlier non-reward stage's output, or the base model for the first stage."
    )
    reward_model: str | None = Field(default=None, description="The `rewardFrom` stage's output model (ppo/grpo).")
    output_uri: str = Field(description="Where the stage's final model goes.")
    checkpoint_dir: str = Field(description="Where resumable checkpoints go.")
    storage: StorageSpec = Field(description="Storage settings (S3 endpoint, credentials secret).")
    training: TrainingSpec = Field(description="Resolved hyper-parameters.")
    peft: PeftSpec = Field(description="Resolved PEFT settings.")
    deepspeed: DeepSpeedSpec = Field(description="Resolved DeepSpeed settings.")
    resources: ResourcesSpec = Field(description="Resolved compute.")
    attempt: int = Field(default=1, ge=1, description="Attempt number; >1 resumes from the latest checkpoint.")
    suites: list[EvaluationSuite] = Field(
        default_factory=list, description="The `spec.evaluation.suites` this stage is scored on before and after."
    )


def render_stage(
    job_name: str, spec: FineTuneJobSpec, stage_name: str, namespace: str | None = None, attempt: int = 1
) -> StageConfig:
    """Render the frozen config of one stage. Inputs and outputs are derived from storage, so no prior state is needed."""
    index = next(i for i, s in enumerate(spec.stages) if s.name == stage_name)
    stage = spec.stages[index]
    # A stage continues the policy: reward stages produce a scorer, not a policy, so the chain skips them.
    policy_stages = [s for s in spec.stages[:index] if s.type != StageType.reward.value]
    input_model = stage_output_uri(spec.storage, policy_stages[-1].name) if policy_stages else spec.model.source
    return StageConfig(
        job_name=job_name,
        namespace=namespace,
        stage_index=index,
        stage=stage,
        model=spec.model,
        input_model=input_model,
        reward_model=stage_output_uri(spec.storage, stage.reward_from) if stage.reward_from else None,
        output_uri=stage_output_uri(spec.storage, stage.name),
        checkpoint_dir=stage_checkpoint_dir(spec.storage, stage.name),
        storage=spec.storage,
        training=resolve_training(spec, stage),
        peft=stage.peft or spec.peft,
        deepspeed=stage.deepspeed or spec.deepspeed,
        resources=stage.resources or spec.resources,
        attempt=attempt,
        suites=[suite for suite in spec.evaluation.suites if _scores(suite, stage)],
    )


def _scores(suite: EvaluationSuite, stage: StageSpec) -> bool:
    """A suite scores the stages it names, or by default every stage that continues the policy (not reward stages)."""
    if suite.stages is not None:
        return stage.name in suite.stages
    return stage.type != StageType.reward.value
