"""Reward, DPO, KTO and ORPO stages learn the toy addition preferences on CPU, fail fast on bad input, and gate.

Every stage starts from the tiny random-init model and trains on examples/data/prefs.jsonl (20 pairs held out).
Learning is judged on the held-out pairs only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_api.render import StageConfig, render_stage
from finetune_api.report import StageReport
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.errors import ConfigError, DataValidationError, QualityGateError
from finetune_trainer.reporting import FileReporter
from finetune_trainer.stage import run_stage
from finetune_trainer.tiny_model import write_tiny_model

REPO = Path(__file__).resolve().parents[2]
PREFS = REPO / "examples" / "data" / "prefs.jsonl"
UNTRAINED_PAIR_LOSS = 0.6931  # -log sigmoid(0): a scorer that cannot tell chosen from rejected

# Small, fast settings: ~120 optimizer steps over 180 training pairs, no intermediate checkpoints.
FAST_TRAINING = {
    "epochs": 10,
    "learningRate": 1e-3,
    "batchSize": 16,
    "maxLength": 64,
    "loggingSteps": 10,
    "saveSteps": 1000,
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), REPO / "examples" / "data")


def stage_config(
    tmp_path: Path, model: Path, stage: dict, peft: str = "full", training: dict | None = None
) -> StageConfig:
    stage = {"name": stage["type"], "dataset": {"uri": str(PREFS)}, **stage}
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": str(model)},
            "storage": {"uri": str(tmp_path / "artifacts")},
            "peft": {"method": peft, "r": 16, "alpha": 32, "dropout": 0.0},
            "training": {**FAST_TRAINING, **(training or {})},
            "stages": [stage],
        }
    )
    return render_stage("prefs", spec, stage["name"])


def run(config: StageConfig, tmp_path: Path) -> tuple[dict[str, float], StageReport]:
    """Run the stage as the stage entrypoint does; its metrics and the last report it published."""
    metrics = run_stage(config, FileReporter(tmp_path / "report.json", min_interval=0), use_ray=False)
    return metrics, last_report(tmp_path)


def last_report(tmp_path: Path) -> StageReport:
    return StageReport.model_validate(json.loads((tmp_path / "report.json").read_text()))


def held_out_pairs(config: StageConfig) -> list[dict]:
    """The same seeded split the stage used."""
    import datasets

    rows = [json.loads(line) for line in PREFS.read_text().splitlines()]
    split = datasets.Dataset.from_list(rows).train_test_split(
        test_size=config.stage.dataset.validation_split, seed=config.training.seed
    )
    return list(split["test"])


def held_out_margins_of_saved_model(config: StageConfig) -> torch.Tensor:
    """score(chosen) - score(rejected) per held-out pair, from the stage output loaded as a plain sequence classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.output_uri)
    model = AutoModelForSequenceClassification.from_pretrained(config.output_uri).eval()
    pairs = held_out_pairs(config)

    @torch.no_grad()
    def score(texts: list[str]) -> torch.Tensor:
        batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
        return model(**batch).logits.squeeze(-1)

    return score([p["prompt"] + p["chosen"] for p in pairs]) - score([p["prompt"] + p["rejected"] for p in pairs])


def assert_merged_causal_lm(config: StageConfig) -> None:
    from transformers import AutoModelForCausalLM

    output = Path(config.output_uri)
    assert not (output / "adapter_config.json").exists(), "the stage output must be merged, not an adapter"
    AutoModelForCausalLM.from_pretrained(output)


# ---- reward model ---------------------------------------------------------------------------------------------------


@pytest.mark.train
def test_reward_model_ranks_held_out_pairs(tiny_model, tmp_path):
    config = stage_config(tmp_path, tiny_model, {"type": "reward", "reward": {"minRewardAccuracy": 0.8}})
    metrics, report = run(config, tmp_path)

    assert metrics["eval_reward_accuracy"] >= 0.8
    assert metrics["eval_reward_margin"] > 0
    assert metrics["eval_loss_after"] < UNTRAINED_PAIR_LOSS
    assert report.phase == "Succeeded" and report.metrics == pytest.approx(metrics)
    # The saved model, reloaded with its score head, scores the held-out pairs exactly as the trained one did.
    margins = held_out_margins_of_saved_model(config)
    assert (margins > 0).float().mean().item() == pytest.approx(metrics["eval_reward_accuracy"])
    assert margins.mean().item() == pytest.approx(metrics["eval_reward_margin"], abs=1e-4)


@pytest.mark.train
def test_reward_model_with_lora_trains_and_saves_the_score_head(tiny_model, tmp_path):
    # Adapters on a random-init model learn less than full training (in a pipeline they start from the SFT model), so
    # this test asks for held-out learning and, above all, for the trained head to be what was saved.
    config = stage_config(tmp_path, tiny_model, {"type": "reward"}, peft="lora", training={"learningRate": 3e-3})
    metrics, _ = run(config, tmp_path)

    assert metrics["eval_loss_after"] < UNTRAINED_PAIR_LOSS and metrics["eval_reward_margin"] > 0
    assert not (Path(config.output_uri) / "adapter_config.json").exists()
    # A score head saved untrained (or not saved at all) would score the held-out pairs differently after reloading.
    margins = held_out_margins_of_saved_model(config)
    assert margins.mean().item() == pytest.approx(metrics["eval_reward_margin"], abs=1e-4)
    assert (margins > 0).float().mean().item() == pytest.approx(metrics["eval_reward_accuracy"])


@pytest.mark.train
def test_reward_model_on_conversations_without_a_prompt_column(tiny_model, tmp_path):
    data = tmp_path / "conversations.jsonl"
    with data.open("w") as out:
        for line in PREFS.read_text().splitlines():
            pair = json.loads(line)
            user = {"role": "user", "content": pair["prompt"]}
            chosen, rejected = ({"role": "assistant", "content": pair[key].strip()} for key in ("chosen", "rejected"))
            out.write(json.dumps({"chosen": [user, chosen], "rejected": [user, rejected]}) + "\n")
    config = stage_config(tmp_path, tiny_model, {"type": "reward", "dataset": {"uri": str(data)}})
    metrics, _ = run(config, tmp_path)

    assert metrics["eval_reward_accuracy"] >= 0.8
    assert metrics["eval_loss_after"] < UNTRAINED_PAIR_LOSS


@pytest.mark.train
def test_reward_quality_gate_fails_the_stage_and_writes_no_output(tiny_model, tmp_path):
    # Two tiny steps cannot reach a perfect held-out ranking; the checkpoint they save must survive the failure.
    config = stage_config(
        tmp_path,
        tiny_model,
        {"type": "reward", "reward": {"minRewardAccuracy": 1.0}},
        training={"maxSteps": 2, "learningRate": 1e-5, "saveSteps": 2},
    )
    with pytest.raises(QualityGateError) as failure:
        run(config, tmp_path)

    assert failure.value.reason == "QualityGateFailed" and failure.value.permanent
    assert "held-out reward accuracy" in str(failure.value) and "minRewardAccuracy 1.000" in str(failure.value)
    assert not Path(config.output_uri).exists()
    assert (Path(config.checkpoint_dir) / "checkpoint-2").is_dir()
    report = last_report(tmp_path)
    assert report.phase == "Failed" and report.reason == "QualityGateFailed"


# ---- DPO, KTO, ORPO -------------------------------------------------------------------------------------------------


@pytest.mark.train
@pytest.mark.parametrize(
    ("peft", "options"),
    [("lora", {"beta": 0.1}), ("full", {"beta": 0.1, "lossType": "ipo"})],
    ids=["lora-sigmoid", "full-ipo"],
)
def test_dpo_prefers_held_out_chosen_answers(tiny_model, tmp_path, peft, options):
    config = stage_config(tmp_path, tiny_model, {"type": "dpo", "dpo": options}, peft=peft)
    metrics, report = run(config, tmp_path)

    assert metrics["eval_reward_accuracy"] > 0.5
    assert metrics["eval_reward_margin"] > 0
    assert report.phase == "Succeeded"
    assert_merged_causal_lm(config)


@pytest.mark.train
def test_dpo_with_lora_resumes_from_the_latest_checkpoint(tiny_model, tmp_path):
    def history(config: StageConfig, step: int) -> list[dict]:
        state = Path(config.checkpoint_dir) / f"checkpoint-{step}" / "trainer_state.json"
        return [entry for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]  # training logs

    short = {"maxSteps": 2, "saveSteps": 2, "loggingSteps": 1}
    first = stage_config(tmp_path, tiny_model, {"type": "dpo"}, peft="lora", training=short)
    run(first, tmp_path)
    first_steps = history(first, 2)

    # A retry with a longer budget continues from checkpoint-2 rather than starting over. Its other seed would shuffle
    # other batches into steps 1-2, so a restart could not reproduce the first attempt's logs for them.
    retry = stage_config(
        tmp_path, tiny_model, {"type": "dpo"}, peft="lora", training={**short, "maxSteps": 4, "seed": 7}
    )
    metrics, report = run(retry.model_copy(update={"attempt": 2}), tmp_path)

    assert report.phase == "Succeeded" and report.step == 4 and report.last_checkpoint.endswith("checkpoint-4")
    final_steps = history(retry, 4)
    assert len(final_steps) == 4 and final_steps[:2] == first_steps
    assert 0 <= metrics["eval_reward_accuracy"] <= 1


@pytest.mark.train
def test_kto_from_preference_pairs_separates_held_out_completions(tiny_model, tmp_path):
    config = stage_config(
        tmp_path, tiny_model, {"type": "kto", "kto": {"beta": 0.1}}, peft="lora", training={"epochs": 5}
    )
    metrics, _ = run(config, tmp_path)

    assert metrics["eval_reward_margin"] > 0
    assert metrics["eval_reward_accuracy"] > 0.5
    assert_merged_causal_lm(config)


@pytest.mark.train
def test_kto_from_unpaired_labelled_completions(tiny_model, tmp_path):
    data = tmp_path / "unpaired.jsonl"
    with data.open("w") as out:
        for line in PREFS.read_text().splitlines():
            pair = json.loads(line)
            # String labels, as a CSV export would have them.
            out.write(json.dumps({"prompt": pair["prompt"], "completion": pair["chosen"], "label": "true"}) + "\n")
            out.write(json.dumps({"prompt": pair["prompt"], "completion": pair["rejected"], "label": "false"}) + "\n")
    config = stage_config(tmp_path, tiny_model, {"type": "kto", "dataset": {"uri": str(data)}}, training={"epochs": 5})
    metrics, _ = run(config, tmp_path)

    assert metrics["eval_reward_margin"] > 0
    assert metrics["eval_reward_accuracy"] > 0.5


@pytest.mark.train
def test_orpo_prefers_held_out_chosen_answers(tiny_model, tmp_path):
    config = stage_config(tmp_path, tiny_model, {"type": "orpo", "orpo": {"beta": 0.1}})
    metrics, _ = run(config, tmp_path)

    assert metrics["eval_reward_margin"] > 0
    assert metrics["eval_reward_accuracy"] > 0.5
    assert_merged_causal_lm(config)


# ---- held-out metrics ----------------------------------------------------------------------------------------------


@pytest.mark.train
@pytest.mark.parametrize("stage_type", ["dpo", "kto", "orpo"])
def test_held_out_preference_metrics_do_not_depend_on_the_eval_batch_size(tiny_model, tmp_path, stage_type):
    # 20 held-out pairs: batches of 3 leave a short last batch of 2, batches of 8 one of 4. An average of per-batch
    # means weighs those like full batches, so it changes with the batch size; a per-pair metric does not.
    results = []
    for eval_batch_size in (2, 3, 8):
        run_dir = tmp_path / f"eval-batch-{eval_batch_size}"
        run_dir.mkdir()
        training = {"maxSteps": 12, "loggingSteps": 4, "evalBatchSize": eval_batch_size}
        config = stage_config(run_dir, tiny_model, {"type": stage_type}, training=training)
        metrics, _ = run(config, run_dir)
        results.append(metrics)
    first = results[0]
    assert 0 < first["eval_reward_accuracy"] < 1, first  # a partly trained model: batch weighting would show
    for other in results[1:]:
        assert other["eval_reward_accuracy"] == first["eval_reward_accuracy"], results
        assert other["eval_reward_margin"] == pytest.approx(first["eval_reward_margin"], abs=1e-5), results


@pytest.mark.train
@pytest.mark.parametrize("stage_type", ["reward", "dpo"])
def test_a_max_length_that_drops_every_row_fails_before_training(tiny_model, tmp_path, stage_type):
    # Reward drops pairs longer than maxLength; DPO drops pairs whose prompt alone fills it.
    data = tmp_path / "long-prompts.jsonl"
    with data.open("w") as out:
        for line in PREFS.read_text().splitlines():
            pair = json.loads(line)
            out.write(json.dumps({**pair, "prompt": "Think it over carefully. " * 4 + pair["prompt"]}) + "\n")
    stage = {"type": stage_type, "dataset": {"uri": str(data)}}
    config = stage_config(tmp_path, tiny_model, stage, training={"maxLength": 16})
    with pytest.raises(DataValidationError) as failure:
        run(config, tmp_path)
    assert "none of the 180 training rows is left once tokenized to training.maxLength 16" in str(failure.value)
    assert failure.value.permanent and not Path(config.checkpoint_dir).exists()


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("stage_type", ["reward", "dpo", "orpo"])
def test_missing_rejected_column_names_the_file_line_and_column(tmp_path, stage_type):
    data = tmp_path / "no-rejected.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 plus 2?", "chosen": " 3"}) + "\n")
    # The data is checked before the model is loaded, so a model path that does not exist is never touched.
    config = stage_config(tmp_path, tmp_path / "no-model", {"type": stage_type, "dataset": {"uri": str(data)}})

    with pytest.raises(DataValidationError) as failure:
        run(config, tmp_path)

    message = str(failure.value)
    assert f"stage {stage_type!r}" in message and f"{data}:line 1" in message
    assert "rejected" in message and "found columns {prompt, chosen}" in message
    assert failure.value.reason == "InvalidDataset"


@pytest.mark.unit
def test_kto_rejects_a_label_that_is_not_a_boolean(tmp_path):
    data = tmp_path / "labels.jsonl"
    rows = [{"prompt": "What is 1 plus 2?", "completion": " 3", "label": "true"}] * 9
    rows.append({"prompt": "What is 1 plus 2?", "completion": " 4", "label": "maybe"})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stage = {"type": "kto", "dataset": {"uri": str(data), "validationSplit": 0.5}}
    config = stage_config(tmp_path, tmp_path / "no-model", stage)

    with pytest.raises(
        DataValidationError, match=r"`label` is 'maybe' in the row with prompt 'What is 1 plus 2\?'; expected"
    ):
        run(config, tmp_path)


@pytest.mark.unit
def test_kto_needs_two_completions_per_micro_batch(tmp_path):
    config = stage_config(tmp_path, tmp_path / "no-model", {"type": "kto"}, training={"batchSize": 1})

    with pytest.raises(ConfigError, match=r"kto needs training.batchSize >= 2, got 1"):
        run(config, tmp_path)
