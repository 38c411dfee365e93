"""CPT and SFT stages learn the toy addition data on CPU: held-out loss after training is below the loss before.

Each run is in-process (no Ray) on the tiny random-init model; a few dozen steps take seconds.
"""

import json
from pathlib import Path

import pytest
from stage_helpers import DATA
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.train


def assert_learned(metrics, report, config, margin=0.3):
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - margin, metrics
    assert metrics["perplexity_after"] == pytest.approx(2.718281828 ** metrics["eval_loss_after"], rel=1e-4)
    assert report.phase == "Succeeded" and report.checkpoint == config.output_uri
    assert report.metrics["eval_loss_after"] == metrics["eval_loss_after"]
    assert AutoModelForCausalLM.from_pretrained(config.output_uri) is not None  # merged, loadable model


def instruct_rows():
    return [json.loads(line) for line in (DATA / "instruct.jsonl").read_text().splitlines()]


def test_cpt_full_learns_with_generation_eval(render, run_in_process):
    config = render(
        {
            "type": "cpt",
            "dataset": {"uri": str(DATA / "domain.txt")},
            "generationEval": {"samples": 8, "maxNewTokens": 6},
        }
    )
    metrics, report = run_in_process(config)
    assert_learned(metrics, report, config, margin=2.0)
    assert 0.0 <= metrics["rougeL"] <= 1.0 and 0.0 <= metrics["bleu"] <= 100.0


def test_cpt_lora_learns_and_saves_a_merged_model(render, run_in_process):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}}, peft="lora", training={"learningRate": 1e-2}
    )
    metrics, report = run_in_process(config)
    assert_learned(metrics, report, config)
    saved = Path(config.output_uri)
    assert (saved / "model.safetensors").exists() and not (saved / "adapter_config.json").exists()


def write_variant(tmp_path, name):
    rows = instruct_rows()
    if name == "alpaca":
        rows = [
            {"instruction": r["prompt"], "context": "Answer with a number.", "response": r["completion"].strip()}
            for r in rows
        ]
    elif name == "messages":
        rows = [
            {
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"].strip()},
                ]
            }
            for r in rows
        ]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("variant", ["prompt_completion", "alpaca", "messages"])
def test_sft_learns_each_row_format(render, run_in_process, tmp_path, variant):
    path = write_variant(tmp_path, variant)
    config = render({"type": "sft", "dataset": {"uri": str(path)}, "generationEval": {"samples": 8, "maxNewTokens": 3}})
    metrics, report = run_in_process(config)
    assert_learned(metrics, report, config, margin=1.0)
    assert "rougeL" in metrics and "bleu" in metrics


def test_sft_with_a_named_chat_template_adds_its_tokens(render, run_in_process, tmp_path):
    from transformers import AutoTokenizer

    path = write_variant(tmp_path, "messages")
    config = render({"type": "sft", "dataset": {"uri": str(path)}}, model_options={"chatTemplate": "llama3"})
    metrics, report = run_in_process(config)
    assert_learned(metrics, report, config, margin=1.0)
    tokenizer = AutoTokenizer.from_pretrained(config.output_uri)
    assert "<|eot_id|>" in tokenizer.get_vocab() and "<|start_header_id|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(config.output_uri)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_sft_lora_with_packing_learns(render, run_in_process):
    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
        peft="lora",
        training={"packing": True, "learningRate": 1e-2, "batchSize": 4},
    )
    metrics, report = run_in_process(config)
    assert_learned(metrics, report, config)


def test_sft_on_chat_messages_stops_generating_at_the_end_of_turn(render, run_in_process, tmp_path):
    from transformers import AutoTokenizer

    path = write_variant(tmp_path, "messages")
    config = render(
        {"type": "sft", "dataset": {"uri": str(path)}, "generationEval": {"samples": 16, "maxNewTokens": 8}},
        training={"maxSteps": 150},
    )
    metrics, _ = run_in_process(config)

    tokenizer = AutoTokenizer.from_pretrained(config.output_uri)
    model = AutoModelForCausalLM.from_pretrained(config.output_uri)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert end_of_turn in model.generation_config.eos_token_id and tokenizer.convert_tokens_to_ids("</s>") in (
        model.generation_config.eos_token_id
    )
    # With nothing but the saved generation config, greedy decoding ends the answer at the first end of turn.
    row = instruct_rows()[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert generated[-1] == end_of_turn and (generated == end_of_turn).sum() == 1, tokenizer.decode(generated)
    # Answers come out as text, not as a run of end-of-turn markers that decodes to '' (ROUGE-L 0); the tiny model gets
    # about a fifth of the held-out sums right after 150 steps.
    assert metrics["rougeL"] > 0.1, metrics


def test_tokens_a_chat_template_adds_are_trained_under_lora(render, run_in_process, tmp_path, monkeypatch):
    import torch

    from finetune_trainer import modeling

    initial = {}
    fit_embeddings = modeling._fit_embeddings

    def record_new_rows(model, tokenizer):
        new_ids = fit_embeddings(model, tokenizer)
        if new_ids and "input" not in initial:
            initial["ids"] = new_ids
            initial["input"] = model.get_input_embeddings().weight[new_ids].detach().clone()
            initial["output"] = model.get_output_embeddings().weight[new_ids].detach().clone()
        return new_ids

    monkeypatch.setattr(modeling, "_fit_embeddings", record_new_rows)
    path = write_variant(tmp_path, "messages")
    config = render(
        {"type": "sft", "dataset": {"uri": str(path)}},
        peft="lora",
        model_options={"chatTemplate": "llama3"},  # its header and end-of-turn tokens are new to the tiny tokenizer
        training={"learningRate": 1e-2},
    )
    run_in_process(config)

    saved = AutoModelForCausalLM.from_pretrained(config.output_uri)
    ids = initial["ids"]
    assert len(ids) == 3
    # The new rows moved from their initialisation, in the input embedding and in the (untied) output layer.
    assert not torch.allclose(saved.get_input_embeddings().weight[ids], initial["input"])
    assert not torch.allclose(saved.get_output_embeddings().weight[ids], initial["output"])
