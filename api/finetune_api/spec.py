"""FineTuneJob spec: what a user writes.

Every field carries a description; the CRD (and so `kubectl explain`) is generated from these models.
Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from finetune_api import uris
from finetune_api.uris import uri_scheme  # noqa: F401 - callers read the scheme from the spec module

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Suite and task names become parts of status metric keys (`<suite>_loss_after`, `eval_loss_<task>`).
TASK_NAME = r"^[a-z][a-z0-9_]*$"
# Stage names end up inside child object names (job.stage.attempt.config, a cut RayJob name) and label values.
STAGE_NAME_MAX = 30

# Kubernetes object names: a Secret is a DNS-1123 subdomain.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Label keys may carry a DNS-subdomain prefix: 253 + "/" + 63; values are at most 63.
LABEL_KEY_MAX = 317
LABEL_VALUE_MAX = 63
MAP_MAX_ENTRIES = 64
# A Kubernetes quantity of bytes (`16Gi`, `512M`).
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"
QUANTITY_MAX = 32
# Jinja chat templates of current models run to ~10 KiB; leave room.
CHAT_TEMPLATE_MAX = 65536
# Upper bound for counts (steps, samples, seconds...): large enough for any real run, small enough to stay exact in JSON.
COUNT_MAX = 1_000_000_000

MODEL_SCHEMES = ("hf", "s3", "pvc", "file")
DATASET_SCHEMES = ("hf", "s3", "pvc", "file")
STORAGE_SCHEMES = ("s3", "pvc", "file")


def uri_type(allowed: tuple[str, ...]) -> Any:
    """A URI string checked by `finetune_api.uris` here and, as the same rules in CEL, by the API server."""
    return Annotated[
        str,
        AfterValidator(lambda uri: uris.check_uri(uri, allowed)),
        Field(
            min_length=1,
            max_length=uris.URI_MAX_LENGTH,
            json_schema_extra={"x-kubernetes-validations": uris.cel_rules(allowed)},
        ),
    ]


def cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    """One CRD `x-kubernetes-validations` entry: the API server's restatement of a validator next to it."""
    return {"rule": rule, "message": message, **extra}


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules into the generated CRD."""
    return {"x-kubernetes-validations": list(rules)}


ModelUri = uri_type(MODEL_SCHEMES)
DatasetUri = uri_type(DATASET_SCHEMES)
StorageUri = uri_type(STORAGE_SCHEMES)
SecretName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelKey = Annotated[str, Field(min_length=1, max_length=LABEL_KEY_MAX)]
LabelValue = Annotated[str, Field(max_length=LABEL_VALUE_MAX)]


class ApiModel(BaseModel):
    """Base for every spec/status model: camelCase wire names, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The Kubernetes (camelCase, None-free) form of this object."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SpecModel(ApiModel):
    """Base for what a user writes: parsed as strictly as the API server does (no coercion, finite numbers only)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StageType(StrEnum):
    cpt = "cpt"
    sft = "sft"
    reward = "reward"
    dpo = "dpo"
    kto = "kto"
    orpo = "orpo"
    ppo = "ppo"
    grpo = "grpo"


PREFERENCE_STAGES = {StageType.dpo.value, StageType.kto.value, StageType.orpo.value}
RL_STAGES = {StageType.ppo.value, StageType.grpo.value}


class ModelSpec(SpecModel):
    source: ModelUri = Field(
        description=(
            "Base model to fine-tune: a Hugging Face Hub id (`org/name` or `hf://org/name`), a local or mounted path, "
            "`s3://bucket/prefix` or `pvc://claim/path`."
        ),
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        description="Hub revision (branch, tag or commit) when `source` is a Hub id.",
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        description="Name of a Secret in the job's namespace holding `HF_TOKEN` and/or `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`.",
    )
    tokenizer: ModelUri | None = Field(
        default=None, description="Tokenizer source when it differs from `source` (same URI forms)."
    )
    chat_template: str | None = Field(
        default=None,
        max_length=CHAT_TEMPLATE_MAX,
        description="Chat template for `messages` data, used instead of the tokenizer's own: `chatml`, `llama3`, or a Jinja template string.",
    )
    trust_remote_code: bool = Field(default=False, description="Allow custom modelling code shipped with the model.")


class StorageSpec(SpecModel):
    uri: StorageUri = Field(
        description=(
            "Where stage checkpoints and final models are written: a local path, a mounted volume path, `pvc://claim/path` "
            "or `s3://bucket/prefix`. Each stage writes under `<uri>/<stage name>/`."
        ),
    )
    credentials_secret: SecretName | None = Field(
        default=None, description="Secret with `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` for `s3://` storage."
    )
    endpoint_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^/?#\s]+(/[^\s]*)?$",
        description="S3-compatible endpoint (MinIO, Ceph, R2...) when not AWS; e.g. `http://minio.storage:9000`.",
    )
    retain_on_delete: bool = Field(
        default=True,
        description=(
            "Keep checkpoints and models when the FineTuneJob is deleted. With false, deletion removes the "
            "`checkpoints/` and `model/` directories of the stages this job started, where the operator can reach "
            "them; other files and S3 objects are kept."
        ),
    )


class Toleration(SpecModel):
    key: LabelKey | None = Field(
        default=None, description="Taint key the toleration applies to; empty matches all keys."
    )
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="`Exists` or `Equal` (default).")
    value: LabelValue | None = Field(default=None, description="Taint value to match with `Equal`.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, le=COUNT_MAX, description="How long a NoExecute taint is tolerated."
    )


class ResourcesSpec(SpecModel):
    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Number of Ray worker pods; each runs one training process per GPU (one process without GPUs).",
    )
    gpus_per_worker: int = Field(
        default=0,
        ge=0,
        le=16,
        description=(
            "GPUs per worker pod; 0 trains on CPU. With G > 1 a pod gets G GPUs on one node and runs G one-GPU "
            "training processes, which talk over NVLink/shared memory."
        ),
    )
    cpus_per_worker: int = Field(default=1, ge=1, le=512, description="CPU cores per worker.")
    memory_per_worker: str | None = Field(
        default=None,
        description="Memory per worker as a Kubernetes quantity, e.g. `16Gi`.",
        max_length=QUANTITY_MAX,
        pattern=QUANTITY,
    )
    gpu_resource_name: LabelKey = Field(
        default="nvidia.com/gpu", description="Extended resource name requested for GPUs."
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=MAP_MAX_ENTRIES, description="Node labels the Ray pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations for the Ray pods (e.g. for tainted GPU nodes)."
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Trainer image for the Ray pods; defaults to the operator's configured trainer image.",
    )
    shared_memory: str | None = Field(
        default=None,
        description=(
            "Size of the memory-backed `/dev/shm` of each Ray pod (NCCL's shared-memory transport and Ray's object "
            "store use it), e.g. `32Gi`. Unset: KubeRay's default, sized like the pod's memory request."
        ),
        max_length=QUANTITY_MAX,
        pattern=QUANTITY,
    )
    scratch_size: str | None = Field(
        default=None,
        description=(
            "Size limit of each Ray pod's scratch volume (an emptyDir for caches, downloaded models and checkpoints "
            "before upload), e.g. `200Gi`. Unset: no limit beyond the node's ephemeral storage."
        ),
        max_length=QUANTITY_MAX,
        pattern=QUANTITY,
    )
    env: dict[
        Annotated[str, Field(min_length=1, max_length=256)],
        Annotated[str, Field(max_length=4096)],
    ] = Field(
        default_factory=dict,
        max_length=MAP_MAX_ENTRIES,
        description=(
            "Extra environment of every Ray pod, e.g. `NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA` for the cluster's network; "
            "overrides the operator's defaults (`NCCL_DEBUG=WARN` on GPU pods)."
        ),
    )
    image_pull_secrets: list[SecretName] = Field(
        default_factory=list,
        max_length=16,
        description="Image pull Secrets (in the job's namespace) for the Ray pods, added to the operator's own.",
    )


class DeepSpeedSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                # The CRD stores no defaults: an absent field is the model's default (false, zeroStage 0).
                "!(has(self.offloadParams) && self.offloadParams) || (has(self.zeroStage) && self.zeroStage == 3)",
                "offloadParams requires zeroStage 3",
                fieldPath=".offloadParams",
            ),
            cel(
                "!(has(self.offloadOptimizer) && self.offloadOptimizer) || (has(self.zeroStage) && self.zeroStage > 0)",
                "offloadOptimizer requires zeroStage 1, 2 or 3",
                fieldPath=".offloadOptimizer",
            ),
        )
    )

    zero_stage: int = Field(
        default=0,
        ge=0,
        le=3,
        description="ZeRO stage 0-3: 1 shards optimizer state, 2 adds gradients, 3 adds parameters.",
    )
    offload_optimizer: bool = Field(default=False, description="Offload optimizer state to CPU memory (ZeRO 1-3).")
    offload_params: bool = Field(default=False, description="Offload parameters to CPU memory (ZeRO 3 only).")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offloadParams: requires zeroStage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offloadOptimizer: requires zeroStage 1, 2 or 3")
        return self


# A module name or dotted path as `named_modules()` writes it (`lm_head`, `model.embed_tokens`).
MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"


# Options of the adapters, and the CEL test that one is in use (false and an empty list are the same as unset).
_ADAPTER_ONLY = {
    "use_dora": ("useDora", "has(self.useDora) && self.useDora"),
    "use_rslora": ("useRslora", "has(self.useRslora) && self.useRslora"),
    "modules_to_save": ("modulesToSave", "has(self.modulesToSave) && size(self.modulesToSave) > 0"),
}


class PeftSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            *(
                cel(
                    # The CRD stores no defaults: an absent method is lora.
                    f"!({in_use}) || !has(self.method) || self.method != 'full'",
                    f"{wire} applies to lora and qlora, not method full",
                    fieldPath=f".{wire}",
                )
                for wire, in_use in _ADAPTER_ONLY.values()
            )
        )
    )

    method: Literal["full", "lora", "qlora"] = Field(
        default="lora",
        description="`full` trains every weight; `lora` trains low-rank adapters; `qlora` adds a 4-bit quantized base (GPU only).",
    )
    r: int = Field(default=8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=16, ge=1, le=65536, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        max_length=256,
        description="Module names to adapt (e.g. `q_proj`, `v_proj`); default: all linear layers except the output head.",
    )
    use_dora: bool = Field(
        default=False,
        description="Weight-Decomposed LoRA (DoRA): adapt each weight's direction and magnitude separately (lora/qlora).",
    )
    use_rslora: bool = Field(
        default=False,
        description="Rank-stabilised LoRA: scale adapters by alpha / sqrt(r) instead of alpha / r (lora/qlora).",
    )
    modules_to_save: list[Annotated[str, Field(min_length=1, max_length=256, pattern=MODULE_NAME)]] | None = Field(
        default=None,
        max_length=64,
        description=(
            "Modules trained in full and saved beside the adapters (e.g. `lm_head`, `embed_tokens`), by name as in "
            "the model's `named_modules()` (lora/qlora)."
        ),
    )

    @model_validator(mode="after")
    def _adapter_options_need_adapters(self) -> PeftSpec:
        if self.method == "full":
            for name, (wire, _) in _ADAPTER_ONLY.items():
                if getattr(self, name):
                    raise ValueError(f"{wire}: applies to lora and qlora, not method full")
        return self


class EarlyStoppingSpec(SpecModel):
    patience: int = Field(
        default=3,
        ge=1,
        le=10000,
        description="Stop after this many held-out evaluations in a row without a new best held-out loss.",
    )
    min_delta: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="A held-out loss counts as better only when it is below the best so far by more than this.",
    )


class TrainingSpec(SpecModel):
    """Hyper-parameters. Set once under `spec.training`; a stage's `training` overrides field by field."""

    epochs: float | None = Field(
        default=None,
        gt=0,
        le=10000,
        description="Passes over the training split (default 1). Ignored when `maxSteps` is set.",
    )
    max_steps: int | None = Field(default=None, ge=1, le=COUNT_MAX, description="Stop after this many optimizer steps.")
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Peak learning rate; the default depends on the stage type and PEFT method (e.g. 2e-4 LoRA / 2e-5 full for SFT, 1e-5 LoRA / 3e-6 full for PPO).",
    )
    batch_size: int | None = Field(default=None, ge=1, le=65536, description="Per-worker micro-batch size (default 8).")
    eval_batch_size: int | None = Field(
        default=None, ge=1, le=65536, description="Per-worker batch size of held-out evaluation (default: `batchSize`)."
    )
    gradient_accumulation_steps: int | None = Field(
        default=None, ge=1, le=65536, description="Micro-batches per optimizer step (default 1)."
    )
    max_length: int | None = Field(
        default=None, ge=8, le=1_048_576, description="Maximum tokens per sequence (default 512); CPT block size."
    )
    packing: bool | None = Field(
        default=None, description="Pack several examples into each sequence (SFT; CPT always packs). Default false."
    )
    warmup_ratio: float | None = Field(
        default=None, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate (default 0.03)."
    )
    weight_decay: float | None = Field(default=None, ge=0, le=10, description="AdamW weight decay (default 0).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] | None = Field(
        default=None, description="Learning-rate schedule (default cosine)."
    )
    gradient_checkpointing: bool | None = Field(
        default=None, description="Recompute activations to save memory (default false)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] | None = Field(
        default=None, description="Compute precision; `auto` (default) is bf16 on GPU and fp32 on CPU."
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**32 - 1, description="Random seed for data order and initialisation (default 42)."
    )
    logging_steps: int | None = Field(
        default=None, ge=1, le=COUNT_MAX, description="Report progress every N steps (default 5)."
    )
    save_steps: int | None = Field(
        default=None,
        ge=1,
        le=COUNT_MAX,
        description="Save a resumable checkpoint every N steps (default 50; with `earlyStopping`, `evalSteps`).",
    )
    save_total_limit: int | None = Field(
        default=None, ge=1, le=10000, description="Keep at most this many intermediate checkpoints (default 2)."
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] | None = Field(
        default=None,
        max_length=3,
        description=(
            "Experiment trackers the trainer logs to, besides the stage's metrics.jsonl. `tensorboard` writes under "
            "`<storage>/<stage>/tensorboard`; `mlflow` and `wandb` read their settings and credentials from the "
            "environment (put them in a Secret named in `envFromSecrets`). The tracker's package must be in the image."
        ),
    )
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        le=COUNT_MAX,
        description=(
            "Also evaluate on the held-out rows every N optimizer steps (cpt, sft, reward, dpo, kto and orpo stages; "
            "ppo and grpo stages refuse it in their own `training` and ignore it from `spec.training`). Unset: "
            "held-out evaluation only before and after training."
        ),
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None,
        description=(
            "Stop training once the held-out loss stops improving (`patience` evaluations every `evalSteps`, which "
            "it requires) and make the evaluation with the lowest held-out loss the stage's output; a checkpoint is "
            "saved at every evaluation instead of every `saveSteps`. Same stages as `evalSteps`."
        ),
    )
    min_improvement: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Quality gate: fail the stage (QualityGateFailed, output not written) unless the held-out loss "
        "drops by at least this much (eval_loss_before - eval_loss_after). Unset: no gate.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        default=None,
        description=(
            "Attention kernel the model loads with (transformers' `attn_implementation`); default: transformers' "
            "choice for the model. `flash_attention_2` needs a GPU and the flash-attn package in the trainer image."
        ),
    )
    optimizer: (
        Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "paged_adamw_8bit"] | None
    ) = Field(
        default=None,
        description=(
            "Optimizer (transformers' `optim`). Default: transformers' own (adamw_torch_fused with the image's "
            "torch) for the HF stages, adamw_torch for our PPO loop. `adamw_bnb_8bit` keeps AdamW's state in 8 bits "
            "and `paged_adamw_8bit` also pages it to host memory under pressure; both are bitsandbytes', need a GPU "
            "and come with the trainer image."
        ),
    )
    neftune_noise_alpha: float | None = Field(
        default=None,
        gt=0,
        le=50,
        description=(
            "NEFTune: add uniform noise of this scale (alpha / sqrt(length * hidden size)) to the input embeddings "
            "while training (sft stages; other stage types ignore it). Typical values 5-15; unset: no noise."
        ),
    )


TRAINING_DEFAULTS = TrainingSpec(
    epochs=1.0,
    batch_size=8,
    gradient_accumulation_steps=1,
    max_length=512,
    packing=False,
    warmup_ratio=0.03,
    weight_decay=0.0,
    lr_scheduler="cosine",
    gradient_checkpointing=False,
    precision="auto",
    seed=42,
    logging_steps=5,
    save_steps=50,
    save_total_limit=2,
)


class DatasetSpec(SpecModel):
    uri: DatasetUri = Field(
        description=(
            "Training data: a local path, `s3://`, `pvc://` or a Hub dataset id (`hf://org/name`). Files: .jsonl, .json, .parquet, .csv, "
            ".txt, or a `datasets` save-to-disk directory."
        ),
    )
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "text", "arrow"] = Field(
        default="auto",
        description="File format; `auto` picks by extension (a directory is read as `arrow`, i.e. save-to-disk).",
    )
    validation_uri: DatasetUri | None = Field(
        default=None, description="A separate validation file; when set, `validationSplit` is ignored."
    )
    validation_split: float = Field(
        default=0.1, gt=0, lt=1, description="Fraction of the data held out for evaluation."
    )
    columns: dict[
        Annotated[str, Field(min_length=1, max_length=256)], Annotated[str, Field(min_length=1, max_length=256)]
    ] = Field(
        default_factory=dict,
        max_length=MAP_MAX_ENTRIES,
        description="Rename columns from the file's names to the stage's expected names, e.g. `{question: prompt}`.",
    )
    max_samples: int | None = Field(
        default=None, ge=1, le=COUNT_MAX, description="Use at most this many training examples."
    )
    credentials_secret: SecretName | None = Field(
        default=None, description="Secret with credentials for `s3://` or private Hub datasets."
    )


class EvaluationSuite(SpecModel):
    """A held-out set every stage is scored on before and after training: the guard against catastrophic forgetting."""

    name: str = Field(
        max_length=40,
        pattern=TASK_NAME,
        description="Suite name (lower case, digits, `_`); it prefixes the suite's status metrics, e.g. `<name>_loss_after`.",
    )
    uri: DatasetUri = Field(
        description=(
            "The suite's rows (same URI forms and file formats as `dataset.uri`). `text` suites: a `text` column "
            "(a .txt file is one row per line) or `prompt`/`completion` (loss on the completion). `multipleChoice` "
            "suites: `question`, `choices` (a list of strings) and `answer` (the index of the right choice), and an "
            "optional `task`."
        ),
    )
    type: Literal["text", "multipleChoice"] = Field(
        default="text",
        description=(
            "`text`: token-level held-out loss and perplexity. `multipleChoice`: accuracy, each choice scored by its "
            "log-likelihood per token after the question."
        ),
    )
    max_regression: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description=(
            "Gate: fail the stage (ForgettingDetected, output not written) when the suite gets worse by more than "
            "this: `<name>_loss_after - <name>_loss_before` for text, `<name>_accuracy_before - "
            "<name>_accuracy_after` for multiple choice. Unset: measured and reported, never failing."
        ),
    )
    max_samples: int | None = Field(
        default=None, ge=1, le=COUNT_MAX, description="Score at most the first this many rows (default: all)."
    )
    stages: list[Annotated[str, Field(max_length=STAGE_NAME_MAX, pattern=DNS_LABEL)]] | None = Field(
        default=None,
        max_length=16,
        description="Stages scored on this suite (default: every stage but reward stages, which train a scorer).",
    )


class EvaluationSpec(SpecModel):
    suites: list[EvaluationSuite] = Field(
        default_factory=list,
        max_length=32,
        description="Held-out suites scored before and after every stage (see docs/evaluation.md).",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EvaluationSpec:
        names = [suite.name for suite in self.suites]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ValueError(f"suites[{index}].name: duplicate suite name {name!r}")
        return self


class DatasetSource(DatasetSpec):
    """One dataset of a mixture (`stage.datasets`): a dataset plus its task name and its share of the training rows."""

    task: str | None = Field(
        default=None,
        max_length=40,
        pattern=TASK_NAME,
        description="Task name of the source's rows (default `dataset<index>`); held-out metrics are also reported per task.",
    )
    weight: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description=(
            "Share of the training rows: the weighted sources together keep their total row count, split in "
            "proportion to the weights (a source is repeated or cut to its share). Unset with `samples` unset: all rows."
        ),
    )
    samples: int | None = Field(
        default=None,
        ge=1,
        le=COUNT_MAX,
        description="Exactly this many training rows from the source (repeated when it has fewer). Excludes `weight`.",
    )

    @model_validator(mode="after")
    def _one_share(self) -> DatasetSource:
        if self.weight is not None and self.samples is not None:
            raise ValueError("weight: set either weight or samples, not both")
        return self


class HygieneSpec(SpecModel):
    """Data hygiene before training; each step's count of removed or changed rows goes into the stage's metrics."""

    deduplicate: Literal["off", "exact", "near"] = Field(
        default="off",
        description=(
            "Remove duplicate rows within each dataset before its split: `exact` (same text after lower-casing and "
            "collapsing whitespace), `near` (also word-trigram Jaccard similarity of at least `nearThreshold`)."
        ),
    )
    near_threshold: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Jaccard similarity of word trigrams from which two rows are near-duplicates.",
    )
    decontaminate: bool = Field(
        default=False,
        description=(
            "Remove training rows whose prompt (or text) is also in a held-out row of the stage or in one of the "
            "stage's evaluation suites (the earlier stages' held-out sets), compared after normalising as above."
        ),
    )
    scrub_pii: bool = Field(
        default=False,
        description="Replace e-mail addresses, phone numbers and key-like strings with `<EMAIL>`, `<PHONE>`, `<SECRET>`.",
    )


class SFTOptions(SpecModel):
    template: Literal["auto", "chat", "alpaca", "plain"] = Field(
        default="auto",
        description=(
            "How rows become text: `chat` renders `messages` with the chat template; `alpaca` renders instruction/context/response under "
            "`### Instruction`/`### Context`/`### Response` headings; `plain` concatenates prompt and completion; `auto` picks from the columns."
        ),
    )
    completion_only_loss: bool = Field(
        default=True, description="Compute loss on completions (assistant turns) only, not on prompts."
    )


class GenerationEvalSpec(SpecModel):
    samples: int = Field(default=16, ge=1, le=10000, description="Held-out prompts to generate for.")
    max_new_tokens: int = Field(default=32, ge=1, le=4096, description="Greedy generation length.")


class RewardOptions(SpecModel):
    min_reward_accuracy: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Quality gate: fail the pipeline here if held-out pairwise accuracy is below this.",
    )
    center_rewards_coefficient: float | None = Field(
        default=None, ge=0, le=100, description="Penalty pulling rewards towards zero mean."
    )


class DPOOptions(SpecModel):
    beta: float = Field(
        default=0.1, gt=0, le=100, description="Strength of the implicit KL constraint to the reference model."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(default="sigmoid", description="DPO loss variant.")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="Assumed label-noise rate (conservative DPO)."
    )


class KTOOptions(SpecModel):
    beta: float = Field(default=0.1, gt=0, le=100, description="KL constraint strength.")
    desirable_weight: float = Field(default=1.0, gt=0, le=1000, description="Loss weight of desirable examples.")
    undesirable_weight: float = Field(default=1.0, gt=0, le=1000, description="Loss weight of undesirable examples.")


class ORPOOptions(SpecModel):
    beta: float = Field(
        default=0.1, gt=0, le=100, description="Weight of the odds-ratio preference term (lambda in the paper)."
    )


class PPOOptions(SpecModel):
    """PPO with a learned reward model. Defaults follow TRL's PPOv2 unless noted."""

    total_episodes: int | None = Field(
        default=None,
        ge=1,
        le=COUNT_MAX,
        description="Prompts to roll out in total (default: one pass over the prompts, times `training.epochs`).",
    )
    rollout_batch_size: int = Field(default=16, ge=1, le=65536, description="Prompts per rollout (one PPO step).")
    mini_batches: int = Field(
        default=1, ge=1, le=65536, description="Mini-batches each rollout is split into for updates."
    )
    ppo_epochs: int = Field(default=4, ge=1, le=1000, description="Optimisation passes over each rollout (PPOv2: 4).")
    temperature: float = Field(default=0.7, gt=0, le=100, description="Sampling temperature (PPOv2: 0.7).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(default=53, ge=1, le=1_048_576, description="Response length limit (PPOv2: 53).")
    missing_eos_penalty: float | None = Field(
        default=None, ge=0, le=1000, description="Subtracted from the score of responses that never emit EOS."
    )
    kl_coef: float = Field(
        default=0.05, ge=0, le=1000, description="Initial KL penalty coefficient beta (PPOv2: 0.05)."
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        default="k1", description="Per-token KL estimator: k1 = log ratio, k3 = unbiased low-variance."
    )
    kl_clamp: float = Field(
        default=10.0, gt=0, le=1000, description="Per-token KL estimates are clamped to +-this (OpenRLHF: 10)."
    )
    kl_target: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="Enables the adaptive KL controller with this target KL (Ziegler et al.).",
    )
    kl_horizon: int = Field(
        default=10000, ge=1, le=COUNT_MAX, description="Adaptive KL controller horizon in episodes."
    )
    gamma: float = Field(default=1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda.")
    clip_range: float = Field(default=0.2, gt=0, le=100, description="Policy ratio clip.")
    clip_range_value: float = Field(default=0.2, gt=0, le=1000, description="Value prediction clip.")
    vf_coef: float = Field(default=0.1, ge=0, le=1000, description="Value loss coefficient.")
    reward_clip: float | None = Field(default=None, gt=0, le=1_000_000, description="Clip scores to +-this before use.")
    normalize_reward: bool = Field(default=False, description="Normalise scores with running mean/std.")
    whiten_rewards: bool = Field(default=False, description="Whiten per-token rewards before GAE.")
    value_init: Literal["reward", "policy"] = Field(
        default="reward",
        description="Initialise the value model from the reward model (`reward`) or as a head on the policy (`policy`).",
    )
    max_kl: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="Quality gate: abort the stage when the mean KL to the reference exceeds this.",
    )


class GRPOOptions(SpecModel):
    num_generations: int = Field(default=4, ge=2, le=1024, description="Completions per prompt (the group).")
    beta: float = Field(default=0.04, ge=0, le=100, description="KL coefficient to the reference.")
    temperature: float = Field(default=1.0, gt=0, le=100, description="Sampling temperature.")
    max_new_tokens: int = Field(default=64, ge=1, le=1_048_576, description="Completion length limit.")
    epsilon: float = Field(default=0.2, gt=0, le=100, description="Policy ratio clip.")


# Stage types whose held-out loss `training.evalSteps` and `training.earlyStopping` watch (the HF Trainer stages).
HELD_OUT_LOSS_STAGES = ("cpt", "sft", "reward", "dpo", "kto", "orpo")
_HELD_OUT_ONLY = {"eval_steps": "evalSteps", "early_stopping": "earlyStopping"}

# Stage types with their own options block (`stages[].dpo`, `stages[].ppo`, ...), allowed only on stages of that type.
OPTION_STAGES = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo")
_RL_TYPES = "[" + ", ".join(f"'{t}'" for t in sorted(RL_STAGES)) + "]"


class StageSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                f"!(self.type in {_RL_TYPES}) || has(self.rewardFrom)",
                "rewardFrom is required for ppo and grpo stages: the name of an earlier reward stage",
                fieldPath=".rewardFrom",
                reason="FieldValueRequired",
            ),
            cel(
                f"!has(self.rewardFrom) || self.type in {_RL_TYPES}",
                "rewardFrom is only allowed on ppo and grpo stages",
                fieldPath=".rewardFrom",
                reason="FieldValueForbidden",
            ),
            cel(
                "has(self.dataset) != has(self.datasets)",
                "set exactly one of dataset (one dataset) and datasets (a mixture)",
                fieldPath=".dataset",
                reason="FieldValueRequired",
            ),
            *(
                cel(
                    f"!has(self.{option}) || self.type == '{option}'",
                    f"{option} options are only allowed on a stage of type {option}",
                    messageExpression=f"'{option} options are only allowed on a stage of type {option}, not ' + self.type",
                    fieldPath=f".{option}",
                    reason="FieldValueForbidden",
                )
                for option in OPTION_STAGES
            ),
            cel(
                f"!(self.type in {_RL_TYPES}) || !has(self.training) || "
                "!has(self.training.evalSteps) && !has(self.training.earlyStopping)",
                "training.evalSteps and training.earlyStopping apply to the held-out loss of cpt, sft, reward, dpo, "
                "kto and orpo stages, not ppo or grpo",
                fieldPath=".training",
                reason="FieldValueForbidden",
            ),
        )
    )

    name: str = Field(
        description="Stage name, unique in the job (DNS-1123 label, at most 30 characters).",
        max_length=STAGE_NAME_MAX,
        pattern=DNS_LABEL,
    )
    # Enum values arrive as strings, from YAML and from the API server alike.
    type: Annotated[StageType, Strict(False)] = Field(
        description="What the stage trains: cpt, sft, reward, dpo, kto, orpo, ppo or grpo."
    )
    dataset: DatasetSpec | None = Field(
        default=None, description="The stage's data (or `datasets` for a mixture of several)."
    )
    datasets: list[DatasetSource] | None = Field(
        default=None,
        min_length=1,
        # With 16 stages, a larger mixture would put the URI rules over the API server's CEL cost budget.
        max_length=8,
        description="A mixture of datasets, each with a task name and a weight or sample count (instead of `dataset`).",
    )
    hygiene: HygieneSpec = Field(
        default_factory=HygieneSpec, description="Deduplication, decontamination and PII scrubbing of the stage's data."
    )
    mixing: Literal["interleave", "concat"] = Field(
        default="interleave",
        description=(
            "How `datasets` are combined: `interleave` shuffles the sources' rows together (deterministic by "
            "`training.seed`); `concat` keeps the sources in order, one after the other."
        ),
    )
    reward_from: str | None = Field(
        default=None,
        description="For ppo/grpo: the name of an earlier `reward` stage whose model scores the rollouts.",
        max_length=STAGE_NAME_MAX,
        pattern=DNS_LABEL,
    )
    training: TrainingSpec | None = Field(default=None, description="Overrides of `spec.training` for this stage.")
    peft: PeftSpec | None = Field(default=None, description="Overrides `spec.peft` for this stage.")
    deepspeed: DeepSpeedSpec | None = Field(default=None, description="Overrides `spec.deepspeed` for this stage.")
    resources: ResourcesSpec | None = Field(default=None, description="Overrides `spec.resources` for this stage.")
    export: Literal["merged", "adapter", "both"] = Field(
        default="merged",
        description=(
            "What the stage's output directory (`<storage>/<stage>/model`) holds besides the tokenizer and a model "
            "card (README.md): `merged`, the model with any LoRA adapters folded in (what the next stage starts "
            "from); `adapter`, only the LoRA adapter, under `adapter/` (no later stage may start from, or score "
            "with, this stage's model); `both`. `adapter` and `both` need peft.method lora or qlora."
        ),
    )
    generation_eval: GenerationEvalSpec | None = Field(
        default=None,
        description="cpt/sft: generate for held-out prompts and report ROUGE-L and BLEU against the references.",
    )
    sft: SFTOptions | None = Field(default=None, description="Options for `sft` stages.")
    reward: RewardOptions | None = Field(default=None, description="Options for `reward` stages.")
    dpo: DPOOptions | None = Field(default=None, description="Options for `dpo` stages.")
    kto: KTOOptions | None = Field(default=None, description="Options for `kto` stages.")
    orpo: ORPOOptions | None = Field(default=None, description="Options for `orpo` stages.")
    ppo: PPOOptions | None = Field(default=None, description="Options for `ppo` stages.")
    grpo: GRPOOptions | None = Field(default=None, description="Options for `grpo` stages.")

    @model_validator(mode="after")
    def _options_match_type(self) -> StageSpec:
        if (self.dataset is None) == (self.datasets is None):
            raise ValueError("dataset: set exactly one of dataset (one dataset) and datasets (a mixture)")
        tasks = [task for task, _, _ in self.data_sources()]
        for index, task in enumerate(tasks):
            if task in tasks[:index]:
                raise ValueError(f"datasets[{index}].task: duplicate task name {task!r}")
        for option in OPTION_STAGES:
            if getattr(self, option) is not None and self.type != option:
                raise ValueError(f"{option}: options only allowed on a stage of type {option}, not {self.type}")
        if self.type in RL_STAGES and not self.reward_from:
            raise ValueError(f"rewardFrom: a {self.type} stage needs the name of an earlier reward stage here")
        if self.reward_from and self.type not in RL_STAGES:
            raise ValueError("rewardFrom: only allowed on ppo and grpo stages")
        if self.type in RL_STAGES and self.training is not None:
            for name, wire in _HELD_OUT_ONLY.items():
                if getattr(self.training, name) is not None:
                    raise ValueError(
                        f"training.{wire}: applies to the held-out loss of cpt, sft, reward, dpo, kto and orpo "
                        f"stages, not {self.type}"
                    )
        return self

    def consumers(self, later: list[StageSpec]) -> list[StageSpec]:
        """The stages among `later` that load this stage's model: the next policy stages, or the stages scoring with
        a reward model."""
        if self.type == StageType.reward.value:
            return [stage for stage in later if stage.reward_from == self.name]
        return [stage for stage in later if stage.type != StageType.reward.value]

    def data_sources(self) -> list[tuple[str, str, DatasetSpec]]:
        """(task name, field path, dataset) of each of the stage's datasets; a lone `dataset` is task `default`."""
        if self.dataset is not None:
            return [("default", "dataset", self.dataset)]
        return [
            (source.task or f"dataset{index}", f"datasets[{index}]", source)
            for index, source in enumerate(self.datasets or [])
        ]


# CEL for `_check_stage_graph` below. Stage names are unique (the first rule), so `indexOf` on the stage objects gives
# their positions. Messages map to names before filtering: the API server's cost estimate only bounds strings that way.
_STAGE_NAMES_UNIQUE = cel(
    "self.all(s, self.exists_one(t, t.name == s.name))",
    "stage names must be unique",
    # No `reason: FieldValueDuplicate`: the API server prints that reason without the message.
    messageExpression="'stage names must be unique: ' + "
    "self.map(s, s.name).filter(n, self.filter(t, t.name == n).size() > 1)[0] + ' appears more than once'",
)
_VALID_REWARD_FROM = "self.exists(r, r.name == s.rewardFrom && r.type == 'reward' && self.indexOf(r) < self.indexOf(s))"
_REWARD_FROM_EARLIER_REWARD_STAGE = cel(
    f"self.all(s, !has(s.rewardFrom) || {_VALID_REWARD_FROM})",
    "rewardFrom must name an earlier stage of type reward",
    messageExpression="'stage ' + self.map(n, n.name).filter(n, self.exists(s, s.name == n && has(s.rewardFrom) && "
    f"!{_VALID_REWARD_FROM}))[0] + ': rewardFrom must name an earlier stage of type reward'",
)
_ADAPTER_ONLY_CONSUMED = (
    "has(s.export) && s.export == 'adapter' && self.exists(t, self.indexOf(t) > self.indexOf(s) && "
    "(s.type == 'reward' ? has(t.rewardFrom) && t.rewardFrom == s.name : t.type != 'reward'))"
)
_ADAPTER_ONLY_LAST = cel(
    f"self.all(s, !({_ADAPTER_ONLY_CONSUMED}))",
    "export adapter writes no merged model, but a later stage loads it; use export both",
    messageExpression="'stage ' + self.map(n, n.name).filter(n, self.exists(s, s.name == n && "
    f"{_ADAPTER_ONLY_CONSUMED}))[0] + ': export adapter writes no merged model, but a later stage loads it; use "
    "export both'",
)
# The CRD stores no defaults: an absent peft.method is lora, and a stage without `peft` has the job's.
_FULL = "has({0}.peft) && has({0}.peft.method) && {0}.peft.method == 'full'"
_EXPORT_WITHOUT_ADAPTER = (
    f"has(s.export) && s.export != 'merged' && (has(s.peft) ? {_FULL.format('s')} : {_FULL.format('self')})"
)
_EARLY_STOPPING_WITHOUT_EVAL_STEPS = (
    f"!(s.type in {_RL_TYPES}) && "
    "(has(s.training) && has(s.training.earlyStopping) || has(self.training) && has(self.training.earlyStopping)) && "
    "!(has(s.training) && has(s.training.evalSteps) || has(self.training) && has(self.training.evalSteps))"
)


def _stage_rule(bad: str, message: str) -> dict[str, str]:
    """A job-level rule that no stage is `bad` (a CEL condition on stage `s`), its message naming the first that is."""
    return cel(
        f"self.stages.all(s, !({bad}))",
        message,
        messageExpression="'stage ' + self.stages.map(n, n.name).filter(n, self.stages.exists(s, s.name == n && "
        f"{bad}))[0] + ': {message}'",
        fieldPath=".stages",
    )


RUNTIME_KINDS = ("FineTuneRuntime", "ClusterFineTuneRuntime")


class RuntimeRef(SpecModel):
    kind: Literal["FineTuneRuntime", "ClusterFineTuneRuntime"] = Field(
        description="`FineTuneRuntime` (in the job's namespace) or `ClusterFineTuneRuntime` (cluster-wide)."
    )
    name: str = Field(
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the runtime the job runs with."
    )


class FineTuneJobSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            *(
                cel(
                    f"has(self.runtimeRef) || has(self.{name})",
                    f"{name} is required unless runtimeRef names a runtime that sets it",
                    fieldPath=f".{name}",
                    reason="FieldValueRequired",
                )
                for name in ("model", "storage")
            ),
            _stage_rule(_EXPORT_WITHOUT_ADAPTER, "export adapter and both need peft.method lora or qlora, not full"),
            _stage_rule(
                _EARLY_STOPPING_WITHOUT_EVAL_STEPS,
                "training.earlyStopping requires training.evalSteps, the held-out evaluations it watches",
            ),
        )
    )

    runtime_ref: RuntimeRef | None = Field(
        default=None,
        description=(
            "A runtime whose `spec.defaults` fill what this job leaves out and whose `spec.policy` the job must keep. "
            "Merge rules: objects merge key by key (recursively), lists and scalars set here replace the runtime's. "
            "The merged spec is recorded in `status.effectiveSpec` when the first stage starts; later runtime edits "
            "do not change a started job."
        ),
    )
    model: ModelSpec | None = Field(
        default=None,
        description="The base model the first stage starts from. Required unless `runtimeRef` names a runtime that sets it.",
    )
    storage: StorageSpec | None = Field(
        default=None,
        description="Where checkpoints and stage outputs are written. Required unless `runtimeRef` names a runtime that sets it.",
    )
    stages: list[StageSpec] = Field(
        min_length=1,
        max_length=16,
        description="Stages run in order; each starts from the previous stage's output model.",
        json_schema_extra=cel_rules(_STAGE_NAMES_UNIQUE, _REWARD_FROM_EARLIER_REWARD_STAGE, _ADAPTER_ONLY_LAST),
    )
    peft: PeftSpec = Field(
        default_factory=PeftSpec, description="Parameter-efficient fine-tuning settings for every stage."
    )
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed settings for every stage.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute for every stage.")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Hyper-parameters for every stage (a stage may override)."
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        description="Held-out suites every stage is scored on before and after training, with forgetting gates.",
    )
    env_from_secrets: list[SecretName] = Field(
        default_factory=list,
        max_length=32,
        description="Secrets whose keys become environment variables of the trainer (e.g. WANDB_API_KEY).",
    )
    suspend: bool = Field(
        default=False,
        description="Stop the running stage (checkpoints are kept) and start nothing; false resumes. Kueue sets this.",
    )
    backoff_limit: int = Field(
        default=2, ge=0, le=100, description="Retries per stage; each retry resumes from the stage's latest checkpoint."
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=COUNT_MAX,
        description="Fail the job if it runs longer than this, suspended time excluded.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=COUNT_MAX,
        description="Delete the FineTuneJob this many seconds after it succeeded or failed.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _model_and_storage_need_a_runtime_to_be_left_out(cls, data: Any, handler: Any) -> FineTuneJobSpec:
        """Without a runtimeRef, `model` and `storage` are required: reported as missing fields, beside the others."""
        missing = []
        if isinstance(data, dict) and data.get("runtimeRef", data.get("runtime_ref")) is None:
            missing = [name for name in ("model", "storage") if data.get(name) is None]
        try:
            spec = handler(data)
        except ValidationError as exc:
            errors = [
                {"type": e["type"], "loc": e["loc"], "input": e["input"], "ctx": e.get("ctx", {})} for e in exc.errors()
            ]
        else:
            if not missing:
                return spec
            errors = []
        missing_errors = [{"type": "missing", "loc": (name,), "input": data} for name in missing]
        raise ValidationError.from_exception_data(cls.__name__, missing_errors + errors)

    @model_validator(mode="after")
    def _check_stage_graph(self) -> FineTuneJobSpec:
        seen: dict[str, str] = {}
        for index, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{index}].name: duplicate stage name {stage.name!r}")
            if stage.reward_from is not None:
                source = seen.get(stage.reward_from)
                if source is None:
                    raise ValueError(
                        f"stages[{index}].rewardFrom: {stage.reward_from!r} is not an earlier stage "
                        f"(earlier stages: {', '.join(seen) or 'none'})"
                    )
                if source != StageType.reward.value:
                    raise ValueError(
                        f"stages[{index}].rewardFrom: stage {stage.reward_from!r} has type {source}, expected a reward stage"
                    )
            seen[stage.name] = stage.type
            self._check_stage_outputs(index, stage)
        for index, suite in enumerate(self.evaluation.suites):
            for name in suite.stages or []:
                if name not in seen:
                    raise ValueError(
                        f"evaluation.suites[{index}].stages: {name!r} is not a stage (stages: {', '.join(seen)})"
                    )
                if seen[name] == StageType.reward.value:
                    raise ValueError(
                        f"evaluation.suites[{index}].stages: {name!r} is a reward stage, which trains a scorer, "
                        "not a language model; suites score the policy stages"
                    )
        return self

    def _check_stage_outputs(self, index: int, stage: StageSpec) -> None:
        """`export` against the stage's PEFT method and its consumers; `earlyStopping` against `evalSteps`."""
        if stage.export != "merged" and (stage.peft or self.peft).method == "full":
            raise ValueError(f"stages[{index}].export: {stage.export} needs peft.method lora or qlora, not full")
        consumers = stage.consumers(self.stages[index + 1 :])
        if stage.export == "adapter" and consumers:
            raise ValueError(
                f"stages[{index}].export: adapter writes no merged model, but stage {consumers[0].name!r} loads it; "
                "use export both"
            )
        if stage.type in RL_STAGES:
            return
        own = stage.training or TrainingSpec()
        if own.early_stopping is None and self.training.early_stopping is None:
            return
        if own.eval_steps is None and self.training.eval_steps is None:
            where = f"stages[{index}].training" if own.early_stopping is not None else "training"
            raise ValueError(
                f"{where}.earlyStopping: requires training.evalSteps, the held-out evaluations it watches "
                f"(stage {stage.name!r} sets none)"
            )

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    namespace: str | None = None


class FineTuneJob(SpecModel):
    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion", description="finetune.dev/v1alpha1")
    kind: Literal["FineTuneJob"] = Field(description="FineTuneJob")
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    # The status is the operator's (or `finetune run`'s) to write; a manifest may carry one but it is not validated here.
    status: dict[str, Any] | None = None
