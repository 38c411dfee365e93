"""Held-out evaluation shared by the language-modelling recipes (cpt, sft): loss before/after and generation quality."""

from __future__ import annotations

import math

from finetune_trainer.metrics import corpus_bleu, mean_rouge_l
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


def preference_metrics(ctx: StageContext, trainer) -> dict[str, float]:
    """Held-out implicit-reward metrics from TRL's preference trainers (DPO, ORPO), logged once on rank 0."""
    evaluation = trainer.evaluate()
    metrics = {
        "eval_reward_accuracy": evaluation["eval_rewards/accuracies"],
        "eval_reward_margin": evaluation["eval_rewards/margins"],
        "eval_loss": evaluation["eval_loss"],
    }
    ctx.log(
        f"held-out reward accuracy {metrics['eval_reward_accuracy']:.3f}, margin {metrics['eval_reward_margin']:.3f}"
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
                    eos_token_id=tokenizer.eos_token_id,
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
