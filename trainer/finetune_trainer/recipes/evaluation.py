"""Held-out evaluation shared by the language-modelling recipes (cpt, sft): loss before/after and generation quality."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from finetune_api.render import join_uri, stage_root
from finetune_trainer import storage
from finetune_trainer.metrics import corpus_bleu, exact_match, mean_rouge_l, rouge_l, sentence_bleu
from finetune_trainer.modeling import stop_token_ids
from finetune_trainer.recipes.context import StageContext

PREDICTIONS_FILE = "predictions.jsonl"


def eval_loss(trainer) -> float:
    return float(trainer.evaluate()["eval_loss"])


def eval_loss_before(trainer) -> float:
    """The held-out loss of the input model: the `eval_on_start` evaluation, kept in the state across resumes.

    Evaluating before train() is not an option: DeepSpeed ZeRO 1/2 engines only exist once training starts.
    """
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if not evaluations:
        raise RuntimeError("no evaluation at the start of training; TrainingArguments.eval_on_start must be set")
    return float(min(evaluations, key=lambda entry: entry.get("step", 0))["eval_loss"])


def gather_held_out(trainer, per_batch: Callable[[dict], tuple]) -> list:
    """Per-example values over the whole held-out set, each example once, whatever the batch size and worker count.

    `per_batch(batch)` returns a tuple of tensors with one value per example of the batch (pair, or completion).
    Each is gathered with `gather_for_metrics`, which drops the examples a distributed sampler repeats to even out the
    last batch. Averages of per-batch means (what TRL logs) weigh a short last batch like a full one and count those
    repeats, so their value depends on the batch size and the number of workers.
    """
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    columns: list[list] = []
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader():
                with trainer.accelerator.autocast():
                    values = per_batch(batch)
                if not columns:
                    columns = [[] for _ in values]
                for column, value in zip(columns, values):
                    column.append(trainer.accelerator.gather_for_metrics(value.detach().float()))
    finally:
        model.train(was_training)
    return [torch.cat(column) for column in columns]


def completion_logps(model, batch):
    """Summed log-probability of each row's completion tokens, through the same fused LM head TRL scores with."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    output = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        use_cache=False,
        fused_lm_head=True,
    )
    return output.log_probs[:, -(batch["input_ids"].size(1) - 1) :].sum(-1)


def pair_metrics(ctx: StageContext, chosen, rejected) -> dict[str, float]:
    """Held-out accuracy (reward(chosen) > reward(rejected)) and mean margin over every pair, logged on rank 0."""
    margins = chosen - rejected
    metrics = {
        "eval_reward_accuracy": (margins > 0).float().mean().item(),
        "eval_reward_margin": margins.mean().item(),
    }
    ctx.log(
        f"held-out pairs: {len(margins)}, reward accuracy {metrics['eval_reward_accuracy']:.3f}, "
        f"margin {metrics['eval_reward_margin']:.3f}"
    )
    return metrics


def loss_metrics(before: float, after: float, train_output) -> dict[str, float]:
    metrics = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "perplexity_before": math.exp(min(before, 50.0)),
        "perplexity_after": math.exp(min(after, 50.0)),
    }
    if train_output is not None and "train_loss" in train_output.metrics:
        metrics["train_loss"] = float(train_output.metrics["train_loss"])
    return metrics


def task_losses(trainer, rows: list[dict], tasks: list[str], to_dataset: Callable[[list[dict]], object]) -> dict:
    """`eval_loss_<task>` of the trained model on each task's held-out rows, when the stage has several tasks.

    `to_dataset(rows)` builds what `trainer.evaluate` takes (the recipe's own held-out form).
    """
    names = list(dict.fromkeys(tasks))
    if len(names) < 2:
        return {}
    metrics = {}
    for name in names:
        subset = [row for row, task in zip(rows, tasks) if task == name]
        if subset:
            prefix = f"eval_{name}"
            metrics[f"eval_loss_{name}"] = float(
                trainer.evaluate(to_dataset(subset), metric_key_prefix=prefix)[f"{prefix}_loss"]
            )
    return metrics


def score_predictions(predictions: list[str], references: list[str], tasks: list[str]) -> dict[str, float]:
    """exact_match, rougeL and bleu overall and, with several tasks, per task (`<metric>_<task>`)."""

    def scores(indices: list[int]) -> dict[str, float]:
        chosen_p, chosen_r = [predictions[i] for i in indices], [references[i] for i in indices]
        return {
            "exact_match": sum(exact_match(p, r) for p, r in zip(chosen_p, chosen_r)) / len(indices),
            "rougeL": mean_rouge_l(chosen_p, chosen_r),
            "bleu": corpus_bleu(chosen_p, chosen_r),
        }

    metrics = scores(list(range(len(predictions))))
    names = list(dict.fromkeys(tasks))
    if len(names) > 1:
        for name in names:
            per_task = scores([i for i, task in enumerate(tasks) if task == name])
            metrics.update({f"{key}_{name}": value for key, value in per_task.items()})
    return metrics


def round_robin(tasks: list[str]) -> list[int]:
    """Indices taking one example of each task in turn, so that `samples` covers every task of a mixture."""
    queues: dict[str, list[int]] = {}
    for index, task in enumerate(tasks):
        queues.setdefault(task, []).append(index)
    order: list[int] = []
    for depth in range(max((len(q) for q in queues.values()), default=0)):
        order.extend(queue[depth] for queue in queues.values() if depth < len(queue))
    return order


def write_predictions(ctx: StageContext, records: list[dict]) -> str:
    """`predictions.jsonl` next to the stage's model (`<storage>/<stage>/predictions.jsonl`); rank 0 only."""
    uri = join_uri(stage_root(ctx.config.storage, ctx.config.stage.name), PREDICTIONS_FILE)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / PREDICTIONS_FILE
            local.write_text(text, encoding="utf-8")
            storage.upload_file(local, uri, ctx.config.storage.endpoint_url)
    else:
        target = storage.local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return uri


def generation_metrics(
    ctx: StageContext, model, tokenizer, prompts: list[str], references: list[str], tasks: list[str] | None = None
) -> dict[str, float]:
    """Greedy generation for held-out prompts; exact match, word-level ROUGE-L and BLEU against the references,
    overall and per task; every example (with its scores) goes to `predictions.jsonl`.

    Every rank generates (ZeRO-3 needs all ranks in each forward pass); the result is the same on all of them.
    """
    import torch

    spec = ctx.config.stage.generation_eval
    tasks = tasks if tasks is not None else ["default"] * len(prompts)
    chosen = round_robin(tasks)[: spec.samples]
    prompts, references, tasks = ([values[i] for i in chosen] for values in (prompts, references, tasks))
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last prompt token
    try:
        for start in range(0, len(prompts), 8):
            batch = tokenizer(prompts[start : start + 8], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                output = model.generate(
                    **batch,
                    max_new_tokens=spec.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop_token_ids(tokenizer, model),
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            predictions.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    for prompt, prediction, reference in list(zip(prompts, predictions, references))[:3]:
        ctx.log(f"sample: {prompt!r} -> {prediction!r} (reference {reference!r})")
    references = [r.strip() for r in references]
    if ctx.is_main:
        records = [
            {
                "task": task,
                "prompt": prompt,
                "reference": reference,
                "output": prediction,
                "exact_match": exact_match(prediction, reference),
                "rougeL": rouge_l(prediction, reference),
                "bleu": sentence_bleu(prediction, reference),
            }
            for prompt, reference, prediction, task in zip(prompts, references, predictions, tasks)
        ]
        ctx.log(f"wrote {len(records)} predictions to {write_predictions(ctx, records)}")
    return score_predictions(predictions, references, tasks)
