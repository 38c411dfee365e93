"""Periodic held-out evaluation and early stopping: training stops once the held-out loss stops improving, and the
stage's output is the best evaluation's model."""

import json
from pathlib import Path

import pytest
from stage_helpers import DATA, job_spec

pytestmark = pytest.mark.train

MAX_STEPS = 40


def answer_shift(tmp_path: Path) -> tuple[Path, Path]:
    """(training rows, held-out rows): the same prompts, always answered ` 7` in training and ` 3` held out.

    Training first teaches what the two share (an answer is a space, one digit and the end of text), which lowers the
    held-out loss, then that the digit is 7, which raises it again: a held-out curve with a minimum, deterministically.
    """
    prompts = [json.loads(line)["prompt"] for line in (DATA / "instruct.jsonl").read_text().splitlines()]
    paths = []
    for name, answer, rows in (("train", " 7", prompts), ("held-out", " 3", prompts[:32])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": prompt, "completion": answer}) + "\n" for prompt in rows))
        paths.append(path)
    return paths[0], paths[1]


def evaluations(config) -> dict[int, float]:
    """step -> held-out loss of every periodic evaluation in the stage's metrics.jsonl."""
    history = Path(config.storage.uri) / config.stage.name / "metrics.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    curve: dict[int, float] = {}
    for line in lines:
        if "eval_loss" in line and line["step"] > 0:
            # The first at a step: the evaluation after training (of the restored best model) comes later.
            curve.setdefault(line["step"], line["eval_loss"])
    return curve


def test_training_stops_early_and_the_output_is_the_best_evaluations_model(render, run_in_process, tmp_path):
    train, held_out = answer_shift(tmp_path)
    config = render(
        {"type": "sft", "dataset": {"uri": str(train), "validationUri": str(held_out)}},
        training={
            "maxSteps": MAX_STEPS,
            "evalSteps": 2,
            "earlyStopping": {"patience": 2},
            "saveTotalLimit": 1,
            "learningRate": 1e-2,
        },
    )
    metrics, report = run_in_process(config)
    curve = evaluations(config)
    best_step = min(curve, key=curve.get)
    assert report.phase == "Succeeded"
    assert metrics["train_steps"] < MAX_STEPS and metrics["train_steps"] == max(curve)
    assert metrics["best_step"] == best_step < metrics["train_steps"]
    # Two evaluations without a new best stopped it; the stage's held-out loss is the best one's.
    assert metrics["train_steps"] == best_step + 2 * 2
    assert metrics["eval_loss_after"] == pytest.approx(curve[best_step], abs=1e-5)
    assert metrics["eval_loss_after"] < min(curve[step] for step in curve if step > best_step)
    # The best checkpoint survives saveTotalLimit beside the latest one.
    kept = {path.name for path in Path(config.checkpoint_dir).iterdir()}
    assert kept == {f"checkpoint-{best_step}", f"checkpoint-{int(metrics['train_steps'])}"}

    # A retry resumes from the latest checkpoint and still ends with the best one, from the stage's copy (the
    # previous attempt's scratch directory, which its trainer state names, is gone).
    resumed, report = run_in_process(config.model_copy(update={"attempt": 2}))
    assert report.phase == "Succeeded"
    # The restored patience count stops it again at once (after the step in progress).
    assert resumed["best_step"] == best_step and metrics["train_steps"] <= resumed["train_steps"] < MAX_STEPS
    assert resumed["eval_loss_after"] == pytest.approx(curve[best_step], abs=1e-5)


def stage_context(config, tmp_path):
    from finetune_trainer.recipes.context import StageContext

    return StageContext(config, None, rank=0, world_size=1, work_dir=tmp_path / "work")


@pytest.mark.unit
def test_eval_steps_and_early_stopping_reach_the_training_arguments(render, tmp_path):
    from transformers import EarlyStoppingCallback, TrainingArguments

    sft = {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}}
    periodic = stage_context(render(sft, training={"evalSteps": 5}), tmp_path)
    args = periodic.training_args(TrainingArguments)
    assert (args.eval_strategy, args.eval_steps, args.save_steps) == ("steps", 5, 1000)
    assert not args.load_best_model_at_end and args.eval_on_start
    assert not any(isinstance(callback, EarlyStoppingCallback) for callback in periodic.callbacks())

    training = {"evalSteps": 5, "earlyStopping": {"patience": 4, "minDelta": 0.5}}
    stopping = stage_context(render(sft, training=training), tmp_path)
    args = stopping.training_args(TrainingArguments)
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (
        True,
        "eval_loss",
        False,
    )
    assert args.save_steps == 5  # a checkpoint at every evaluation, so that the best one can be restored
    (callback,) = [c for c in stopping.callbacks() if isinstance(c, EarlyStoppingCallback)]
    assert (callback.early_stopping_patience, callback.early_stopping_threshold) == (4, 0.5)
    assert args.restore_callback_states_from_checkpoint


@pytest.mark.unit
def test_rl_stages_leave_inherited_held_out_options_unused(tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    from finetune_api.render import render_stage

    reward = {"name": "reward", "type": "reward", "dataset": {"uri": str(DATA / "prefs.jsonl")}}
    grpo = {"name": "grpo", "type": "grpo", "dataset": {"uri": str(DATA / "prompts.jsonl")}, "rewardFrom": "reward"}
    training = {"evalSteps": 5, "earlyStopping": {}}
    config = render_stage("test", job_spec(tiny_model_dir, tmp_path / "out", [reward, grpo], training=training), "grpo")
    args = stage_context(config, tmp_path).training_args(TrainingArguments)
    assert args.eval_strategy == "no" and not args.load_best_model_at_end
