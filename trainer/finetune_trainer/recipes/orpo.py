"""Odds Ratio Preference Optimization (TRL's experimental ORPOTrainer): SFT and preference learning in one loss,
with no reference model.

Data: `prompt`/`chosen`/`rejected` text, or conversational `chosen`/`rejected` message lists that carry the prompt.
Held-out metrics are computed over every held-out pair once (not TRL's per-batch means). ORPO's reward is beta times
the length-normalised log-probability of a completion under the policy (there is no reference):
  eval_reward_accuracy  fraction of pairs with reward(chosen) > reward(rejected)
  eval_reward_margin    mean reward(chosen) - reward(rejected)
  eval_loss_before      ORPO loss (NLL of chosen + beta * odds-ratio term) of the input model
  eval_loss_after       the same loss after training
"""

from __future__ import annotations

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from finetune_api.spec import ORPOOptions
from finetune_trainer.recipes import guards
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import eval_loss, eval_loss_before, gather_held_out, pair_metrics

ACCEPTED_COLUMNS = [("prompt", "chosen", "rejected"), ("chosen", "rejected")]


def run(ctx: StageContext) -> dict[str, float]:
    options = ctx.config.stage.orpo or ORPOOptions()
    data = ctx.data(ACCEPTED_COLUMNS)
    tokenizer = ctx.tokenizer()
    # Its batches hold chosen_/rejected_ sequences and no `input_ids` for the HF Trainer's token count, which would
    # warn every step: the ORPO stage reports no tokens/s.
    args = ctx.training_args(ORPOConfig, beta=options.beta, include_num_input_tokens_seen="no")
    trainer = ORPOTrainer(
        model=ctx.causal_lm(),
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    guards.check_rows_left(ctx.config, trainer, len(data.train), len(data.eval))
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())

    metrics = {
        **pair_metrics(ctx, *held_out_rewards(trainer)),
        "eval_loss_before": eval_loss_before(trainer),
        "eval_loss_after": eval_loss(trainer),
    }
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics


def held_out_rewards(trainer: ORPOTrainer):
    """ORPO rewards (chosen, rejected) of every held-out pair, from the trainer's own forward pass."""

    def rewards(batch):
        chosen_logps, rejected_logps = trainer.concatenated_forward(trainer.model, batch)[:2]
        return trainer.beta * chosen_logps, trainer.beta * rejected_logps

    return gather_held_out(trainer, rewards)
