"""The model card (README.md) of a stage output: where the model came from, what it was trained on and how, and how it
scored on held-out data. Written from the rendered StageConfig and the stage's final metrics."""

from __future__ import annotations

import json
from typing import Any

import yaml

from finetune_api.render import StageConfig
from finetune_api.spec import StageType, uri_scheme

ADAPTER_DIR = "adapter"


def hub_or_uri(uri: str) -> str:
    """A model as `from_pretrained` names it: a Hub id without `hf://`, anything else as written."""
    return uri.removeprefix("hf://") if uri_scheme(uri) == "hf" else uri


_METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, separators=(', ', ': '))}`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {key} | {value} |" for key, value in rows])


def _data_rows(config: StageConfig) -> list[str]:
    lines = ["| task | data | training rows | held out |", "|---|---|---|---|"]
    for task, _, source in config.stage.data_sources():
        share = "all rows"
        if getattr(source, "samples", None) is not None:
            share = f"{source.samples} rows"
        elif getattr(source, "weight", None) is not None:
            share = f"weight {source.weight:g}"
        if source.max_samples is not None:
            share += f", at most {source.max_samples}"
        held_out = f"`{source.validation_uri}`" if source.validation_uri else f"{source.validation_split:g} of the rows"
        lines.append(f"| {task} | `{source.uri}` | {share} | {held_out} |")
    return lines


def _contents(config: StageConfig) -> list[str]:
    loader = (
        "AutoModelForSequenceClassification" if config.stage.type == StageType.reward.value else "AutoModelForCausalLM"
    )
    lines = []
    if config.stage.export != "adapter":
        lines.append(f"- this directory: the model with the adapters merged (`{loader}.from_pretrained`)")
    if config.stage.export != "merged":
        lines.append(
            f"- `{ADAPTER_DIR}/`: the {_METHOD_NAMES[config.peft.method]} adapter (`peft.PeftModel.from_pretrained`) on "
            f"`{hub_or_uri(config.input_model)}`, the model this stage started from"
        )
    lines.append("- the tokenizer (with its chat template, when it has one)")
    return lines


def render(config: StageConfig, metrics: dict[str, float], adapter: bool) -> str:
    """README.md for `config`'s output: Hub frontmatter, then contents, data, settings and held-out metrics.

    A card for the `adapter` names the model the stage started from as its base (the adapter applies to that one);
    a merged model's names the job's base model.
    """
    stage = config.stage
    frontmatter = {
        "base_model": hub_or_uri(config.input_model if adapter else config.model.source),
        "library_name": "peft" if adapter else "transformers",
        "tags": ["finetune-operator", stage.type, config.peft.method],
    }
    peft = config.peft.to_wire() if config.peft.method != "full" else {"method": "full"}
    settings = [(f"training.{key}", _value(value)) for key, value in sorted(config.training.to_wire().items())]
    settings += [(f"peft.{key}", _value(value)) for key, value in sorted(peft.items())]
    if config.deepspeed.zero_stage:
        settings.append(("deepspeed.zeroStage", str(config.deepspeed.zero_stage)))
    settings.append(("export", _value(stage.export)))
    parts = [
        "---\n" + yaml.safe_dump(frontmatter, sort_keys=False) + "---",
        f"# {config.job_name} / {stage.name}",
        f"Stage {config.stage_index + 1} (`{stage.type}`) of the FineTuneJob `{config.job_name}`, trained from "
        f"`{hub_or_uri(config.input_model)}` (the job's base model: `{hub_or_uri(config.model.source)}`).",
        "## Contents",
        "\n".join(_contents(config)),
        "## Data",
        "\n".join(_data_rows(config)),
        "## Settings",
        _table(("setting", "value"), settings),
        "## Held-out metrics",
        "The stage's final metrics (defined in the project's docs/trainer.md); `_before` is the model it started from.",
        _table(("metric", "value"), [(key, _value(float(value))) for key, value in sorted(metrics.items())]),
    ]
    return "\n\n".join(parts) + "\n"
