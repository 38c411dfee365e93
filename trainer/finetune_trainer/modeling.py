"""Tokenizers and models from a Hub id, a local directory, `pvc://` or `s3://`; LoRA/QLoRA; merge-and-save.

Hub ids (`org/name` or `hf://org/name`) load with from_pretrained and the token from HF_TOKEN; everything else is
fetched to a local directory first.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from finetune_api.spec import ModelSpec, PeftSpec, uri_scheme
from finetune_trainer import storage, strategy
from finetune_trainer.chat_templates import END_OF_TURN_TOKENS, resolve_chat_template
from finetune_trainer.errors import ConfigError, ModelLoadError, StorageUnavailableError


def resolve(uri: str, cache: Path, endpoint_url: str | None = None) -> str:
    """A path or Hub id that from_pretrained accepts."""
    scheme = uri_scheme(uri)
    if scheme == "hf":
        return uri.removeprefix("hf://")
    if scheme == "s3":
        try:
            return str(storage.fetch_dir(uri, cache, endpoint_url))
        except Exception as exc:  # noqa: BLE001 - any fetch failure means the model is unreachable
            if storage.is_transient(exc):
                raise StorageUnavailableError(f"cannot reach storage for model {uri}: {exc}") from None
            raise ModelLoadError(f"cannot fetch model {uri}: {exc}") from None
    path = storage.local_path(uri)
    if path.exists():
        return str(path)
    if scheme == "file" and not uri.startswith(("/", ".", "~", "file://")) and uri.count("/") == 1:
        return uri  # `org/name`: a Hub id
    raise ModelLoadError(f"model {uri} not found (no such directory {path})")


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return {"revision": spec.revision, "token": os.environ.get("HF_TOKEN"), "trust_remote_code": spec.trust_remote_code}


def load_tokenizer(uri: str, spec: ModelSpec, cache: Path, endpoint_url: str | None = None):
    """Tokenizer with a pad token, right padding, and `spec.chatTemplate` applied when set."""
    from transformers import AutoTokenizer

    source = resolve(uri, cache, endpoint_url)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_kwargs(spec))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer from {uri}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    if spec.chat_template:
        template, tokens = resolve_chat_template(spec.chat_template)
        missing = [t for t in tokens if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.chat_template = template
    ends = end_of_turn_tokens(tokenizer)
    if ends and tokenizer.eos_token not in ends:
        # Generation (and TRL's completion formatting) ends at eos: under a chat template that is the end of a turn.
        tokenizer.eos_token = ends[0]
    return tokenizer


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The end-of-turn tokens the tokenizer's chat template writes (none without a template)."""
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # several named templates
        template = " ".join(template.values())
    vocabulary = tokenizer.get_vocab()
    return [token for token in END_OF_TURN_TOKENS if token in template and token in vocabulary]


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a generation: the tokenizer's eos, its chat template's end-of-turn tokens, the model's eos."""
    ids = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(end_of_turn_tokens(tokenizer))]
    config_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


def load_dtype(precision: dict[str, bool], *, trainable: bool, peft_method: str, deepspeed: bool):
    """The dtype weights load in.

    Weights trained in full without DeepSpeed load in fp32 even under bf16/fp16: the Trainer's autocast computes in
    half precision while AdamW (and fp16's GradScaler, which refuses fp16 gradients) update fp32 master weights.
    DeepSpeed keeps its own fp32 master copy; frozen models, and LoRA's frozen base (PEFT keeps adapters in fp32),
    load in the compute precision.
    """
    import torch

    if trainable and peft_method == "full" and not deepspeed:
        return torch.float32
    return torch.bfloat16 if precision.get("bf16") else torch.float16 if precision.get("fp16") else torch.float32


def _load(auto_cls, uri: str, spec: ModelSpec, cache: Path, endpoint_url: str | None, **kwargs):
    source = resolve(uri, cache, endpoint_url)
    try:
        return auto_cls.from_pretrained(source, **_hub_kwargs(spec), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {uri}: {exc}") from None


def lora_config(peft: PeftSpec, task_type: str = "CAUSAL_LM", **fields: Any):
    """The peft.LoraConfig for `peft` (plus extra LoraConfig `fields`), or None for full fine-tuning."""
    if peft.method == "full":
        return None
    from peft import LoraConfig

    # Modules the spec names train in full beside those the trainer adds (an untied output head for new tokens).
    to_save = list(dict.fromkeys([*(peft.modules_to_save or []), *(fields.pop("modules_to_save", None) or [])]))
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules or "all-linear",
        task_type=task_type,
        use_dora=peft.use_dora,
        use_rslora=peft.use_rslora,
        modules_to_save=to_save or None,
        **fields,
    )


def attention_kwargs(attn_implementation: str | None, gpu: bool) -> dict[str, Any]:
    """from_pretrained's `attn_implementation` (none: transformers' choice), refused before loading when unusable."""
    if attn_implementation is None:
        return {}
    if attn_implementation == "flash_attention_2":
        strategy.require_gpu_package(
            "spec.training.attnImplementation: flash_attention_2", "flash-attn", "flash_attn", gpu, "use sdpa"
        )
    return {"attn_implementation": attn_implementation}


def _quantization(peft: PeftSpec, gpu: bool) -> dict[str, Any]:
    if peft.method != "qlora":
        return {}
    strategy.require_gpu_package(
        "peft.method qlora", "bitsandbytes", "bitsandbytes", gpu, "use lora", strategy.IN_THE_IMAGE
    )
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    }


def _fit_embeddings(model, tokenizer) -> list[int]:
    """Grow the embeddings when the tokenizer gained tokens (e.g. a chat template's turn markers); the new rows' ids."""
    weight = model.get_input_embeddings().weight
    # A weight that ZeRO-3 partitioned while it loaded is empty on each rank; its whole shape is `ds_shape`.
    rows = getattr(weight, "ds_shape", weight.shape)[0]
    if len(tokenizer) <= rows:
        return []
    model.resize_token_embeddings(len(tokenizer))
    return list(range(rows, len(tokenizer)))


def _train_new_tokens(model, new_ids: list[int]) -> dict[str, Any]:
    """LoraConfig fields that train the rows of added tokens instead of leaving them at their initialisation: the new
    input-embedding rows (PEFT trainable tokens), and the output layer in full when it is not tied to the embedding
    (TRL's fused LM head reads the layer's weight directly, which trainable tokens would wrap)."""
    if not new_ids:
        return {}
    names = {module: name for name, module in model.named_modules()}
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    fields: dict[str, Any] = {"trainable_token_indices": {names[embedding]: new_ids}}
    if output is not None and output.weight is not embedding.weight:
        fields["modules_to_save"] = [names[output]]
    return fields


def _apply_peft(model, peft: PeftSpec, task_type: str, gradient_checkpointing: bool, new_ids: list[int]):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if peft.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, lora_config(peft, task_type, **_train_new_tokens(model, new_ids)))


def _match_tokenizer(model, tokenizer) -> list[int]:
    """Fit the embeddings to the tokenizer's vocabulary and set its pad and stop tokens; the ids of added rows."""
    new_ids = _fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_token_ids(tokenizer, model)
    return new_ids


def _prepare(model, tokenizer, peft: PeftSpec, trainable: bool, task_type: str, gradient_checkpointing: bool):
    """Match the tokenizer's vocabulary and pad token; frozen for inference, or with adapters when trained with PEFT."""
    new_ids = _match_tokenizer(model, tokenizer)
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    if peft.method != "full":
        model = _apply_peft(model, peft, task_type, gradient_checkpointing, new_ids)
    return model


def load_causal_lm(
    uri: str,
    spec: ModelSpec,
    tokenizer,
    *,
    peft: PeftSpec,
    trainable: bool,
    precision: dict[str, bool],
    gpu: bool,
    cache: Path,
    endpoint_url: str | None = None,
    gradient_checkpointing: bool = False,
    deepspeed: bool = False,
    attn_implementation: str | None = None,
):
    from transformers import AutoModelForCausalLM

    quantization = _quantization(peft, gpu) if trainable else {}
    attention = attention_kwargs(attn_implementation, gpu)
    model = _load(
        AutoModelForCausalLM,
        uri,
        spec,
        cache,
        endpoint_url,
        dtype=load_dtype(precision, trainable=trainable, peft_method=peft.method, deepspeed=deepspeed),
        **quantization,
        **attention,
    )
    return _prepare(model, tokenizer, peft, trainable, "CAUSAL_LM", gradient_checkpointing)


def load_sequence_classifier(
    uri: str,
    spec: ModelSpec,
    tokenizer,
    *,
    peft: PeftSpec,
    trainable: bool,
    precision: dict[str, bool],
    gpu: bool,
    cache: Path,
    endpoint_url: str | None = None,
    gradient_checkpointing: bool = False,
    deepspeed: bool = False,
    attn_implementation: str | None = None,
):
    """A one-logit scoring head on the model (reward/value models)."""
    from transformers import AutoModelForSequenceClassification

    quantization = _quantization(peft, gpu) if trainable else {}
    attention = attention_kwargs(attn_implementation, gpu)
    model = _load(
        AutoModelForSequenceClassification,
        uri,
        spec,
        cache,
        endpoint_url,
        num_labels=1,
        dtype=load_dtype(precision, trainable=trainable, peft_method=peft.method, deepspeed=deepspeed),
        **quantization,
        **attention,
    )
    return _prepare(model, tokenizer, peft, trainable, "SEQ_CLS", gradient_checkpointing)


def merged(model):
    """The model with LoRA adapters folded into the base weights (unchanged for full fine-tuning).

    Not for QLoRA, whose base weights are quantized: see `reload_and_merge`.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def plain_copy(model, state_dict: dict[str, Any]):
    """A plain, unpartitioned copy of `model` on the CPU holding the weights in `state_dict` (all of `model`'s).

    For a model whose weights ZeRO-3 partitions (`strategy.gather_to_rank_0` gives the state dict). The copy is built
    from `model` itself, not reloaded: the same class and config (a reward model's score head, embeddings grown for
    added tokens, pad and stop tokens), the same generation config and, for a PeftModel, the same adapters (LoRA,
    trainable token rows, modules saved in full). It is built with its weights on the meta device and then takes the
    state dict's tensors as they are (no second copy in memory); a weight the copy lacks or does not expect fails the
    load. Build it with ZeRO-3's partitioned loading off (StageContext._whole_model_loading), or it is partitioned
    too.
    """
    from accelerate import init_empty_weights
    from peft import PeftModel, get_peft_model

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    # The buffers that no state dict holds (rotary frequencies) are computed for real as the copy is built.
    with init_empty_weights(include_buffers=False):
        whole = type(base)._from_config(copy.deepcopy(base.config))
        if isinstance(model, PeftModel):
            name = model.active_adapter
            whole = get_peft_model(whole, copy.deepcopy(model.peft_config[name]), adapter_name=name)
    whole.load_state_dict(state_dict, strict=True, assign=True)
    if getattr(base, "generation_config", None) is not None:
        (whole.get_base_model() if isinstance(whole, PeftModel) else whole).generation_config = copy.deepcopy(
            base.generation_config
        )
    return whole.eval()


# The auto class and from_pretrained arguments each adapter task type loads its base with (as load_causal_lm and
# load_sequence_classifier do).
_TASK_MODELS = {
    "CAUSAL_LM": ("AutoModelForCausalLM", {}),
    "SEQ_CLS": ("AutoModelForSequenceClassification", {"num_labels": 1}),
}


def reload_and_merge(
    adapter_dir: Path,
    base_uri: str,
    spec: ModelSpec,
    tokenizer,
    *,
    cache: Path,
    endpoint_url: str | None = None,
    dtype=None,
):
    """The saved adapter in `adapter_dir` folded into the model it was trained on, `base_uri`, reloaded unquantized.

    This is QLoRA's merged model. `merged(model)` on a QLoRA model would fold the adapters into its 4-bit weights:
    PEFT dequantizes each weight, adds the low-rank update and quantizes the sum again, which rounds much of the small
    update away, and the result is a bitsandbytes checkpoint that the next stage (and vLLM or transformers without
    bitsandbytes) would load quantized or not at all. Folding the same adapter into the original weights instead gives
    a plain checkpoint, the standard way QLoRA adapters are merged.

    The base loads in `dtype` (bf16, the dtype QLoRA computes in, by default) on the CPU: merging is a few additions
    per weight and needs no GPU, and the GPUs still hold the trained model. It is fitted to `tokenizer` first as the
    trained model was (embeddings grown for added tokens, pad and stop tokens), so that the adapter's trainable token
    rows and modules saved in full (an untied output layer, a reward model's score head) load onto matching shapes.
    The adapter's task type picks the model class: a causal LM, or a one-logit sequence classifier.
    """
    import torch
    import transformers
    from peft import PeftConfig, PeftModel

    task_type = PeftConfig.from_pretrained(str(adapter_dir)).task_type
    if task_type not in _TASK_MODELS:
        raise ConfigError(f"cannot merge a {task_type} adapter: only causal LM and sequence classification are trained")
    auto_cls, kwargs = _TASK_MODELS[task_type]
    base = _load(
        getattr(transformers, auto_cls), base_uri, spec, cache, endpoint_url, dtype=dtype or torch.bfloat16, **kwargs
    )
    _match_tokenizer(base, tokenizer)
    # PEFT would otherwise read the adapter's weights onto the GPU, beside the trained model, before copying them over.
    model = PeftModel.from_pretrained(base, str(adapter_dir), torch_device="cpu")
    return model.merge_and_unload().eval()


def save_adapter(model, tokenizer, out_dir: Path, base_model: str) -> None:
    """The LoRA adapter alone (adapter_config.json and its weights) with the tokenizer, naming `base_model` as its base.

    Call before `merged(model)`, which folds the adapter into the base and removes it.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ConfigError("export adapter and both need a model trained with LoRA adapters (peft.method lora or qlora)")
    for adapter in model.peft_config.values():
        # PEFT records the local directory the base was loaded from (a scratch cache); users need where it lives.
        adapter.base_model_name_or_path = base_model
    save_pretrained(model, tokenizer, out_dir)


def save_pretrained(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
