"""The training options reach transformers, PEFT and TRL: rendered config -> TrainingArguments / LoraConfig /
from_pretrained, and one SFT stage with DoRA, rsLoRA, NEFTune and Adafactor that learns."""

from __future__ import annotations

import pytest
from stage_helpers import DATA

from finetune_api.spec import PeftSpec, TrainingSpec
from finetune_trainer import modeling, strategy
from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes.context import StageContext

SFT = {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}}
ADAPTERS = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}


def context(config, tmp_path) -> StageContext:
    return StageContext(config, None, rank=0, world_size=1, work_dir=tmp_path / "work")


@pytest.mark.unit
@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"])
def test_the_optimizer_is_training_arguments_optim(render, tmp_path, optimizer):
    from transformers import TrainingArguments

    args = context(render(SFT, training={"optimizer": optimizer}), tmp_path).training_args(TrainingArguments)
    assert args.optim == optimizer


@pytest.mark.unit
def test_unset_options_keep_transformers_defaults(render, tmp_path):
    from trl import SFTConfig

    ctx = context(render(SFT), tmp_path)
    args = ctx.training_args(SFTConfig)
    assert args.optim == SFTConfig.__dataclass_fields__["optim"].default and args.neftune_noise_alpha is None
    assert ctx._model_kwargs(trainable=True)["attn_implementation"] is None


@pytest.mark.unit
def test_the_sft_recipe_passes_neftune_noise_alpha(render, tmp_path, monkeypatch):
    import trl

    from finetune_trainer.recipes import sft

    seen = {}

    class Stop(Exception):
        pass

    def capture(self, *args, **kwargs):
        seen["args"] = kwargs["args"]
        raise Stop

    monkeypatch.setattr(trl.SFTTrainer, "__init__", capture)
    with pytest.raises(Stop):
        sft.run(context(render(SFT, training={"neftuneNoiseAlpha": 7.5}), tmp_path))
    assert seen["args"].neftune_noise_alpha == 7.5


@pytest.mark.unit
@pytest.mark.parametrize("optimizer", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_are_refused_where_they_cannot_run(render, tmp_path, monkeypatch, optimizer):
    from torch import nn
    from transformers import TrainingArguments

    from finetune_trainer.rl.engines import _optimizer

    # On CPU (the stage's context, and our PPO loop's parameters on CPU): a GPU is needed.
    ctx = context(render(SFT, training={"optimizer": optimizer}), tmp_path)
    with pytest.raises(ConfigError, match=rf"spec\.training\.optimizer: {optimizer} needs a GPU") as info:
        ctx.training_args(TrainingArguments)
    assert info.value.reason == "InvalidConfig"
    with pytest.raises(ConfigError, match="needs a GPU"):
        _optimizer(nn.Linear(2, 2), TrainingSpec(optimizer=optimizer, learning_rate=1e-3))
    # On a GPU without the package (a development environment): named, before training.
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs the bitsandbytes package"):
        strategy.check_optimizer(optimizer, gpu=True)
    strategy.check_optimizer("adamw_torch", gpu=False)


@pytest.mark.unit
def test_lora_config_carries_dora_rslora_and_modules_to_save():
    peft = PeftSpec(r=4, use_dora=True, use_rslora=True, modules_to_save=["lm_head"])
    config = modeling.lora_config(peft)
    assert config.use_dora and config.use_rslora and set(config.modules_to_save) == {"lm_head"}
    # The trainer's own additions (an untied head for new tokens) join the spec's, once each.
    merged = modeling.lora_config(peft, modules_to_save=["lm_head", "score"])
    assert list(merged.modules_to_save) == ["lm_head", "score"]
    plain = modeling.lora_config(PeftSpec())
    assert not plain.use_dora and not plain.use_rslora and plain.modules_to_save is None


@pytest.mark.unit
def test_flash_attention_on_cpu_fails_before_loading_naming_the_field(render, tmp_path, monkeypatch):
    ctx = context(render(SFT, training={"attnImplementation": "flash_attention_2"}), tmp_path)
    monkeypatch.setattr(modeling, "_load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match=r"spec\.training\.attnImplementation: flash_attention_2 needs a GPU") as info:
        ctx.causal_lm()
    assert info.value.reason == "InvalidConfig"


@pytest.mark.unit
def test_flash_attention_without_the_package_is_refused_on_gpu_too(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="flash-attn package"):
        modeling.attention_kwargs("flash_attention_2", gpu=True)
    assert modeling.attention_kwargs(None, gpu=False) == {}


@pytest.mark.unit
def test_qlora_without_bitsandbytes_is_refused_before_loading(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="qlora needs the bitsandbytes package") as info:
        modeling._quantization(PeftSpec(method="qlora"), gpu=True)
    assert info.value.reason == "InvalidConfig"
    with pytest.raises(ConfigError, match="needs a GPU"):
        modeling._quantization(PeftSpec(method="qlora"), gpu=False)
    assert modeling._quantization(PeftSpec(method="lora"), gpu=True) == {}


@pytest.mark.unit
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_the_attention_kernel_reaches_from_pretrained(render, tmp_path, kernel):
    model = context(render(SFT, training={"attnImplementation": kernel}), tmp_path).causal_lm(trainable=False)
    assert model.config._attn_implementation == kernel


@pytest.mark.unit
@pytest.mark.parametrize(
    ("optimizer", "cls"),
    [("adamw_torch", "AdamW"), ("adamw_torch_fused", "AdamW"), ("adafactor", "Adafactor"), ("sgd", "SGD")],
)
def test_the_rl_engine_builds_the_same_optimizer(optimizer, cls):
    from torch import nn

    from finetune_trainer.rl.engines import _optimizer

    built = _optimizer(nn.Linear(2, 2), TrainingSpec(optimizer=optimizer, learning_rate=1e-3, weight_decay=0.1))
    assert type(built).__name__ == cls and built.param_groups[0]["lr"] == 1e-3
    assert built.param_groups[0]["weight_decay"] == 0.1
    if optimizer.startswith("adamw"):
        assert built.param_groups[0]["fused"] == (optimizer == "adamw_torch_fused")


@pytest.mark.train
def test_sft_with_dora_rslora_neftune_and_adafactor_learns(render, run_in_process, monkeypatch):
    import trl

    seen = {}
    train = trl.SFTTrainer.train

    def spy(self, *args, **kwargs):
        seen["args"], seen["peft"] = self.args, self.model.peft_config["default"]
        return train(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "train", spy)
    peft = {**ADAPTERS, "useDora": True, "useRslora": True}
    config = render(
        {**SFT, "peft": peft},
        training={"optimizer": "adafactor", "neftuneNoiseAlpha": 5, "learningRate": 1e-2, "attnImplementation": "sdpa"},
    )
    metrics, report = run_in_process(config)
    assert report.phase == "Succeeded"
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.3, metrics
    assert seen["args"].optim == "adafactor" and seen["args"].neftune_noise_alpha == 5
    assert seen["peft"].use_dora and seen["peft"].use_rslora
