"""QLoRA's merged output: the trained adapter folded into the input model reloaded unquantized
(modeling.reload_and_merge), not into the 4-bit trained model. QLoRA itself needs a GPU and bitsandbytes, so a LoRA
adapter on the tiny model stands in for it: reloading and merging must give the model that merging in memory gives."""

import json
from pathlib import Path

import pytest
import torch
from stage_helpers import DATA
from transformers import AutoModelForCausalLM

from finetune_api.spec import ModelSpec, PeftSpec
from finetune_trainer import modeling
from finetune_trainer.metrics import STAGE_METRICS
from finetune_trainer.recipes.context import StageContext

pytestmark = pytest.mark.train

LORA = PeftSpec.model_validate({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
# Text with the llama3 template's header and end-of-turn tokens, which the tiny tokenizer lacks: their rows train.
TEXTS = ["<|start_header_id|>user<|end_header_id|> What is 3 plus 1?<|eot_id|> 4", "Add 5 and 8.<|eot_id|> 13"]
LOADERS = {"causal_lm": modeling.load_causal_lm, "reward": modeling.load_sequence_classifier}


def model_spec(tiny_model_dir: Path, chat_template: str | None) -> ModelSpec:
    return ModelSpec.model_validate({"source": str(tiny_model_dir), "chatTemplate": chat_template})


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def train_lora(kind: str, spec: ModelSpec, tokenizer, cache: Path, steps: int = 5):
    """A LoRA model of the tiny model trained for a few steps on TEXTS; (model, batch, logits before training)."""
    torch.manual_seed(0)
    model = LOADERS[kind](spec.source, spec, tokenizer, peft=LORA, trainable=True, precision={}, gpu=False, cache=cache)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    before = logits(model, batch)
    # Next-token loss for the LM; for the reward model the first text scores above the second.
    labels = batch["input_ids"] if kind == "causal_lm" else torch.tensor([1.0, -1.0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), batch, before


@pytest.mark.parametrize("kind", ["causal_lm", "reward"])
@pytest.mark.parametrize("chat_template", [None, "llama3"])
def test_reload_and_merge_gives_the_in_memory_merge(kind, chat_template, tiny_model_dir, tmp_path):
    spec = model_spec(tiny_model_dir, chat_template)
    tokenizer = modeling.load_tokenizer(str(tiny_model_dir), spec, tmp_path / "cache")
    model, batch, before = train_lora(kind, spec, tokenizer, tmp_path / "cache")
    if chat_template:  # the embeddings grew and the new rows trained (PEFT trainable tokens)
        plain = modeling.load_tokenizer(str(tiny_model_dir), model_spec(tiny_model_dir, None), tmp_path / "cache")
        assert len(tokenizer) == len(plain) + 3
        assert any("trainable_tokens" in name for name, _ in model.named_parameters())
    adapter = tmp_path / "adapter"
    modeling.save_adapter(model, tokenizer, adapter, str(tiny_model_dir))
    expected = logits(modeling.merged(model), batch)

    reloaded = modeling.reload_and_merge(
        adapter, str(tiny_model_dir), spec, tokenizer, cache=tmp_path / "cache", dtype=torch.float32
    )

    difference = (logits(reloaded, batch) - expected).abs().max().item()
    print(f"{kind} chat_template={chat_template}: max abs logit difference {difference:.3g} (fp32)")
    assert difference < 1e-5, difference
    assert type(reloaded).__name__ == ("LlamaForCausalLM" if kind == "causal_lm" else "LlamaForSequenceClassification")
    # Training changed the model, so the comparison is not between two copies of the base.
    assert (expected - before).abs().max().item() > 1e-3


def test_reload_and_merge_defaults_to_a_bf16_model(tiny_model_dir, tmp_path):
    spec = model_spec(tiny_model_dir, "llama3")
    tokenizer = modeling.load_tokenizer(str(tiny_model_dir), spec, tmp_path / "cache")
    model, batch, _ = train_lora("causal_lm", spec, tokenizer, tmp_path / "cache")
    adapter = tmp_path / "adapter"
    modeling.save_adapter(model, tokenizer, adapter, str(tiny_model_dir))
    expected = logits(modeling.merged(model), batch)

    reloaded = modeling.reload_and_merge(adapter, str(tiny_model_dir), spec, tokenizer, cache=tmp_path / "cache")
    output = tmp_path / "merged"
    modeling.save_pretrained(reloaded, tokenizer, output)

    from safetensors import safe_open

    with safe_open(output / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    saved = AutoModelForCausalLM.from_pretrained(output)
    assert saved.dtype == torch.bfloat16 and saved.get_input_embeddings().weight.shape[0] == len(tokenizer)
    difference = (logits(saved, batch) - expected).abs().max().item()
    print(f"bf16 reload and merge: max abs logit difference {difference:.3g} (logits up to {expected.abs().max():.3g})")
    assert difference < 5e-2, difference


def lora_stage(render, peft: str, export: str, tmp_path: Path, rank: int = 0):
    """(StageContext of an sft stage with `peft` and `export`, its tokenizer, a LoRA model with non-zero adapters)."""
    config = render({"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}, "export": export}, peft=peft)
    ctx = StageContext(config, None, rank=rank, world_size=2 if rank else 1, work_dir=tmp_path / "work")
    tokenizer = ctx.tokenizer()
    # QLoRA needs a GPU and bitsandbytes: the stage's model is loaded as LoRA, which wraps it the same way.
    kwargs = {**ctx._model_kwargs(trainable=True), "peft": LORA}
    model = modeling.load_causal_lm(config.input_model, config.model, tokenizer, **kwargs)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.05)
    return ctx, tokenizer, model


@pytest.mark.parametrize("export", ["merged", "both"])
def test_a_qlora_stage_merges_its_adapter_into_the_reloaded_input_model(render, tmp_path, monkeypatch, export):
    ctx, tokenizer, model = lora_stage(render, "qlora", export, tmp_path)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    expected = logits(model, batch)
    calls = []
    reload_and_merge = modeling.reload_and_merge

    def spy(adapter, base_uri, *args, **kwargs):
        calls.append((base_uri, sorted(path.name for path in Path(adapter).iterdir())))
        return reload_and_merge(adapter, base_uri, *args, **kwargs)

    def refuse(model):
        raise AssertionError("merge_and_unload on the (quantized) trained model")

    monkeypatch.setattr(modeling, "reload_and_merge", spy)
    monkeypatch.setattr(modeling, "merged", refuse)
    ctx._write_final(model, tokenizer, ctx.config.output_uri, {})

    assert len(calls) == 1
    base_uri, adapter_files = calls[0]
    assert base_uri == ctx.config.input_model and "adapter_config.json" in adapter_files
    output = Path(ctx.config.output_uri)
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
    assert (output / "adapter" / "adapter_config.json").is_file() == (export == "both")
    saved = AutoModelForCausalLM.from_pretrained(output)
    assert saved.dtype == torch.bfloat16
    # The adapters are in it: the same function as the trained model, to bf16's precision.
    assert (logits(saved, batch) - expected).abs().max().item() < 5e-2


def test_a_lora_stage_merges_in_memory(render, tmp_path, monkeypatch):
    ctx, tokenizer, model = lora_stage(render, "lora", "merged", tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA stage reloaded its input model")

    monkeypatch.setattr(modeling, "reload_and_merge", refuse)
    ctx._write_final(model, tokenizer, ctx.config.output_uri, {})
    assert (Path(ctx.config.output_uri) / "model.safetensors").is_file()


def test_only_rank_0_reloads_and_merges(render, tmp_path, monkeypatch):
    ctx, tokenizer, model = lora_stage(render, "qlora", "merged", tmp_path, rank=1)

    def refuse(*args, **kwargs):
        raise AssertionError("a rank other than 0 reloaded the input model")

    monkeypatch.setattr(modeling, "reload_and_merge", refuse)
    ctx.save_final(model, tokenizer, dict.fromkeys(STAGE_METRICS["sft"], 1.0))
    assert not Path(ctx.config.output_uri).exists()


def test_under_zero3_the_input_model_reloads_whole(render, tmp_path, monkeypatch):
    """Rank 0 reloads alone: ZeRO-3's partitioned loading (deepspeed.zero.Init) is off for it, and on again after."""
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}}, peft="qlora", deepspeed={"zeroStage": 3}
    )
    ctx = StageContext(config, None, rank=0, world_size=1, work_dir=tmp_path / "work")
    tokenizer = ctx.tokenizer()
    model = modeling.load_causal_lm(
        config.input_model, config.model, tokenizer, **{**ctx._model_kwargs(True), "peft": LORA}
    )
    # What the Trainer's arguments set up under ZeRO-3 (kept referenced: transformers holds it weakly).
    active = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    zero3_while_reloading = []
    reload_and_merge = modeling.reload_and_merge

    def spy(*args, **kwargs):
        zero3_while_reloading.append(is_deepspeed_zero3_enabled())
        return reload_and_merge(*args, **kwargs)

    monkeypatch.setattr(modeling, "reload_and_merge", spy)
    try:
        ctx._write_final(model, tokenizer, config.output_uri, {})
        assert zero3_while_reloading == [False] and is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
        del active
    assert (Path(config.output_uri) / "model.safetensors").is_file()
