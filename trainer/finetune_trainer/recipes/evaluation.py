"""Held-out evaluation shared by the language-modelling recipes (cpt, sft): loss before/after and generation quality."""

from __future__ import annotations

import math
from collections.abc import Callable

from finetune_trainer.metrics import corpus_bleu, mean_rouge_l
from finetune_trainer.modeling import stop_token_ids
from finetune_trainer.recipes.context import StageContext


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


def generation_metrics(
    ctx: StageContext, model, tokenizer, prompts: list[str], references: list[str]
) -> dict[str, float]:
    """Greedy generation for held-out prompts; word-level ROUGE-L and corpus BLEU against the references.

    Every rank generates (ZeRO-3 needs all ranks in each forward pass); the result is the same on all of them.
    """
    import torch

    spec = ctx.config.stage.generation_eval
    prompts, references = prompts[: spec.samples], references[: spec.samples]
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
    return {"rougeL": mean_rouge_l(predictions, references), "bleu": corpus_bleu(predictions, references)}
