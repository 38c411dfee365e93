"""Kahneman-Tversky Optimization (TRL KTOTrainer) on unpaired good/bad completions.

Data: unpaired `prompt`/`completion`/`label` rows (label true = desirable), or preference pairs (`prompt`/`chosen`/
`rejected`, or conversational `chosen`/`rejected`), which become one desirable and one undesirable row per pair.
Rows are shuffled once here: TRL reads KTO data in order (its KL estimate pairs each row with its batch neighbours),
and unpaired pairs would otherwise arrive as all-desirable batches followed by all-undesirable ones.
Reference model: as in DPO, a frozen zero-update copy of the adapter with LoRA, a frozen model copy with full training.
Held-out metrics come from our own pass over every held-out row once, because TRL logs only per-batch reward means:
with the implicit reward r = beta * log(pi / pi_ref) of each held-out completion,
  eval_reward_accuracy  fraction of completions whose r has the sign of their label (> 0 desirable, < 0 undesirable)
  eval_reward_margin    mean r over desirable completions minus mean r over undesirable ones (both must be held out)
  eval_loss_before      TRL's KTO loss on the held-out rows for the input model
  eval_loss_after       the same loss after training
"""

from __future__ import annotations

import torch
from trl import KTOConfig, KTOTrainer, extract_prompt, unpair_preference_dataset

from finetune_api.spec import KTOOptions
from finetune_trainer.errors import ConfigError, DataValidationError
from finetune_trainer.recipes import guards
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import completion_logps, eval_loss, eval_loss_before, gather_held_out

ACCEPTED_COLUMNS = [("prompt", "completion", "label"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")]
_TRUE, _FALSE = ("true", "1", "yes", "desirable"), ("false", "0", "no", "undesirable")


def run(ctx: StageContext) -> dict[str, float]:
    options = ctx.config.stage.kto or KTOOptions()
    batch_size = ctx.config.training.batch_size
    if batch_size < 2:
        # TRL estimates KTO's KL baseline from the other completions in the same micro-batch.
        raise ConfigError(f"stage {ctx.config.stage.name!r}: kto needs training.batchSize >= 2, got {batch_size}")
    data = ctx.data(ACCEPTED_COLUMNS)
    train = unpaired(ctx, data.train).shuffle(seed=ctx.config.training.seed)
    held_out = unpaired(ctx, data.eval)
    if len(set(held_out["label"])) < 2:
        # The held-out reward margin compares desirable with undesirable completions.
        raise DataValidationError(
            f"stage {ctx.config.stage.name!r}: {ctx.config.stage.dataset.uri}: every held-out row is labelled "
            f"{held_out['label'][0]}; expected both desirable and undesirable rows held out (a larger "
            "dataset.validationSplit, or dataset.validationUri)"
        )
    tokenizer = ctx.tokenizer()
    policy = ctx.causal_lm()
    reference = ctx.causal_lm(trainable=False) if ctx.config.peft.method == "full" else None
    args = ctx.training_args(
        KTOConfig,
        beta=options.beta,
        desirable_weight=options.desirable_weight,
        undesirable_weight=options.undesirable_weight,
    )
    trainer = KTOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    guards.check_rows_left(ctx.config, trainer, len(train), len(held_out))
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())

    rewards, labels = held_out_rewards(trainer)
    metrics = {
        "eval_reward_accuracy": ((rewards > 0) == labels).float().mean().item(),
        "eval_reward_margin": (rewards[labels].mean() - rewards[~labels].mean()).item(),
        "eval_loss_before": eval_loss_before(trainer),
        "eval_loss_after": eval_loss(trainer),
    }
    ctx.log(f"held-out rewards: {', '.join(f'{key} {value:.3f}' for key, value in metrics.items())}")
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics


def unpaired(ctx: StageContext, dataset):
    """prompt/completion/label rows with boolean labels, whichever accepted form the data came in."""
    if "label" in dataset.column_names:
        return dataset.map(lambda row: {"label": _as_bool(ctx, row)})
    if "prompt" not in dataset.column_names:
        dataset = dataset.map(extract_prompt)
    return unpair_preference_dataset(dataset)


def _as_bool(ctx: StageContext, row: dict) -> bool:
    value = row["label"]
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise DataValidationError(
        f"stage {ctx.config.stage.name!r}: {ctx.config.stage.dataset.uri}: `label` is {value!r} in the row with prompt "
        f"{str(row['prompt'])[:80]!r}; expected true/false (or desirable/undesirable, 1/0)"
    )


def held_out_rewards(trainer: KTOTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit reward and boolean label of every held-out completion."""

    def rewards(batch):
        # TRL's own reference pass: the frozen reference model, or the policy with its reference adapter.
        reference_logps, _ = trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch)
        return trainer.beta * (completion_logps(trainer.model, batch) - reference_logps), batch["label"]

    rewards, labels = gather_held_out(trainer, rewards)
    return rewards, labels.bool()
