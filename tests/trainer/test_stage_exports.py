"""Stage outputs users pick up: the merged model and/or the LoRA adapter (`stage.export`), the tokenizer and a model
card with the held-out metrics."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from stage_helpers import DATA
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.train

SHORT = {"maxSteps": 8}


def card(output: Path) -> tuple[dict, str]:
    """(frontmatter, body) of the output's README.md."""
    _, frontmatter, body = (output / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(frontmatter), body


def test_export_both_writes_a_merged_model_and_an_adapter_with_the_same_logits(render, run_in_process, tiny_model_dir):
    from peft import PeftModel

    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}, "export": "both"}, peft="lora", training=SHORT
    )
    metrics, report = run_in_process(config)
    output = Path(config.output_uri)
    assert report.phase == "Succeeded" and report.checkpoint == config.output_uri
    assert (output / "model.safetensors").is_file() and not (output / "adapter_config.json").exists()
    adapter = output / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    tokenizer = AutoTokenizer.from_pretrained(output)
    batch = tokenizer(["What is 3 plus 1? 4", "Add 5 and 8. 13"], return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    with torch.no_grad():
        difference = (merged(**batch).logits - on_base(**batch).logits).abs().max().item()
    assert difference < 1e-4, difference
    # The adapter changed the model: the comparison is not between two copies of the base.
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert (merged(**batch).logits - base(**batch).logits).abs().max().item() > 1e-3

    frontmatter, body = card(output)
    assert frontmatter == {
        "base_model": str(tiny_model_dir),
        "library_name": "transformers",
        "tags": ["finetune-operator", "sft", "lora"],
    }
    assert f"| eval_loss_after | {metrics['eval_loss_after']:.6g} |" in body
    assert f"| eval_loss_before | {metrics['eval_loss_before']:.6g} |" in body
    assert f"`{DATA / 'instruct.jsonl'}`" in body and "| training.maxSteps | 8 |" in body
    assert "| peft.r | 16 |" in body and "`adapter/`: the LoRA adapter" in body
    adapter_card, _ = card(adapter)
    assert adapter_card["library_name"] == "peft" and adapter_card["base_model"] == str(tiny_model_dir)


def test_export_adapter_writes_the_adapter_tokenizer_and_card_only(render, run_in_process, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM

    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}, "export": "adapter"},
        peft="lora",
        training=SHORT,
    )
    metrics, report = run_in_process(config)
    output = Path(config.output_uri)
    assert report.phase == "Succeeded"
    assert not (output / "model.safetensors").exists() and not (output / "config.json").exists()
    assert (output / "tokenizer_config.json").is_file() and (output / "adapter" / "tokenizer_config.json").is_file()
    # The adapter names its base, so PEFT finds it alone.
    assert AutoPeftModelForCausalLM.from_pretrained(output / "adapter") is not None
    frontmatter, body = card(output)
    assert frontmatter["library_name"] == "peft" and "this directory: the model" not in body
    assert f"| eval_loss_after | {metrics['eval_loss_after']:.6g} |" in body


def test_the_default_merged_output_carries_a_model_card_too(render, run_in_process):
    config = render({"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}}, training=SHORT)
    metrics, _ = run_in_process(config)
    output = Path(config.output_uri)
    assert not (output / "adapter").exists()
    frontmatter, body = card(output)
    assert frontmatter["tags"] == ["finetune-operator", "cpt", "full"]
    assert f"| perplexity_after | {metrics['perplexity_after']:.6g} |" in body
