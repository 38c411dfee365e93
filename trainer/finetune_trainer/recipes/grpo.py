"""GRPO (TRL's GRPOTrainer) with the pipeline's reward model as the reward function.

Each prompt gets `numGenerations` completions; their advantages are the scores relative to the group, so no value
model is needed. The `rewardFrom` model scores every (prompt, completion) on its own tokenizer (the completions arrive as
text). Data: `prompt` rows (text or chat messages); the held-out split is the evaluation set.

Status metrics, on the held-out prompts (one sampled completion each, at most 64 prompts, scored with the same reward
function as training): reward_mean_first / reward_mean_last (mean reward of the input / trained policy), kl_mean (mean
per-sequence KL of the trained policy to the reference, GRPO's k3 estimator summed over each completion; 0 when beta is
0 under full fine-tuning, which keeps no reference), eval_prompts. From the training logs: train_reward_mean_first /
train_reward_mean_last (mean logged reward over the first / last 20% of logged steps), train_kl_mean (mean logged
per-token KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import unwrap_model_for_generation

from finetune_api.spec import GRPOOptions
from finetune_trainer.errors import ConfigError
from finetune_trainer.modeling import stop_token_ids
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.rl.evaluation import (
    HELD_OUT_PROMPTS,
    HeldOutScores,
    evaluate_prompts,
    sequence_kl,
    summarise,
)
from finetune_trainer.rl.loop import FIRST_LAST_FRACTION
from finetune_trainer.rl.models import TokenScorer, freeze, reference_of
from finetune_trainer.rl.rollout import Prompt, RewardScorer, encode_prompts, reward_text, sample_completions

ACCEPTED_COLUMNS = [("prompt",)]
HELD_OUT_KEY = "held_out_before"  # the input policy's held-out scores, kept in the trainer state's log history


def run(ctx: StageContext) -> dict[str, float]:
    config = ctx.config
    options = config.stage.grpo or GRPOOptions()
    training = config.training
    generation_batch = (training.batch_size or 8) * (training.gradient_accumulation_steps or 1) * ctx.world_size
    if generation_batch % options.num_generations:
        raise ConfigError(
            f"stage {config.stage.name!r}: grpo.numGenerations {options.num_generations} must divide the {generation_batch} completions "
            "generated per step (training.batchSize x training.gradientAccumulationSteps x resources.workers)"
        )
    data = ctx.data(ACCEPTED_COLUMNS)
    tokenizer = ctx.tokenizer()
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.gpu else torch.device("cpu")
    reward_tokenizer = ctx.tokenizer(config.reward_model)
    reward_model = freeze(TokenScorer(ctx.sequence_classifier(config.reward_model, trainable=False))).to(device)
    scorer = RewardScorer(
        reward_model, reward_tokenizer, tokenizer, training.max_length or 512, training.batch_size or 8
    )

    args = ctx.training_args(
        GRPOConfig,
        num_generations=options.num_generations,
        beta=options.beta,
        temperature=options.temperature,
        max_completion_length=options.max_new_tokens,
        epsilon=options.epsilon,
        logging_first_step=True,  # so even a short run logs a reward for the status metrics
        # GRPO counts its prompt and completion tokens itself; the HF count would find no `input_ids` in its batches.
        include_num_input_tokens_seen="no",
        eval_on_start=False,  # the held-out prompts are evaluated by the stage itself (held_out_scores), before and after
    )
    model = ctx.causal_lm()
    stop_ids = stop_token_ids(tokenizer, model)
    reward = reward_function(scorer, stop_ids, device)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )

    def evaluate(when: str) -> HeldOutScores:
        scores = held_out_scores(ctx, trainer, list(data.eval["prompt"]), reward, stop_ids, device)
        ctx.log(f"held-out evaluation {when} training: {scores.describe()}")
        return scores

    trainer.add_callback(HeldOutBefore(lambda: evaluate("before")))
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())
    metrics = {
        **held_out_metrics(trainer.state.log_history, evaluate("after")),
        **logged_metrics(trainer.state.log_history),
    }
    ctx.log(
        "GRPO done: held-out reward {reward_mean_first:.3f} -> {reward_mean_last:.3f}, kl_mean {kl_mean:.4f} "
        "({eval_prompts:.0f} prompts); training reward {train_reward_mean_first:.3f} -> {train_reward_mean_last:.3f}, "
        "train_kl_mean {train_kl_mean:.4f}".format(**metrics)
    )
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics


def reward_function(scorer: RewardScorer, stop_ids: list[int], device: torch.device) -> Callable[..., list[float]]:
    def reward_model_score(prompts, completions, completion_ids, **_) -> list[float]:
        texts = [
            reward_text(scorer.tokenizer, prompt, completion, any(stop in ids for stop in stop_ids))
            for prompt, completion, ids in zip(prompts, completions, completion_ids)
        ]
        return scorer.score_texts(texts, add_special_tokens=isinstance(prompts[0], str), device=device).tolist()

    return reward_model_score


class HeldOutBefore(TrainerCallback):
    """Evaluates the input policy on the held-out prompts once the trainer has prepared its model (DeepSpeed engines
    exist only then), unless a resumed trainer state already holds that evaluation."""

    def __init__(self, evaluate: Callable[[], HeldOutScores]):
        self.evaluate = evaluate

    def on_train_begin(self, args, state, control, **kwargs):
        if not any(HELD_OUT_KEY in entry for entry in state.log_history):
            state.log_history.append({HELD_OUT_KEY: self.evaluate().to_json(), "step": state.global_step})


def held_out_scores(
    ctx: StageContext,
    trainer: GRPOTrainer,
    prompts: list[Prompt],
    reward: Callable[..., list[float]],
    stop_ids: list[int],
    device: torch.device,
) -> HeldOutScores:
    """The policy on the held-out prompts: one completion each, sampled as GRPO samples, scored with the training
    reward function, and its per-sequence KL to the reference (k3, as GRPO estimates it)."""
    options = ctx.config.stage.grpo or GRPOOptions()
    training = ctx.config.training
    tokenizer, model = trainer.processing_class, trainer.model
    max_prompt_tokens = max(1, (training.max_length or 512) - options.max_new_tokens)
    has_reference = trainer.ref_model is not None or hasattr(model, "disable_adapter")

    def per_batch(batch_prompts: list[Prompt]) -> torch.Tensor:
        batch = encode_prompts(tokenizer, batch_prompts, max_prompt_tokens)
        batch.input_ids, batch.attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as policy:
            responses, mask, _ = sample_completions(
                policy,
                batch,
                temperature=options.temperature,
                top_p=1.0,
                max_new_tokens=options.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                stop_token_ids=stop_ids,
            )
        ids = [row[keep].tolist() for row, keep in zip(responses, mask)]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        completions = [
            text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
            for prompt, text in zip(batch_prompts, texts)
        ]
        scores = torch.tensor(reward(prompts=batch_prompts, completions=completions, completion_ids=ids), device=device)
        kl = torch.zeros_like(scores)
        if has_reference:
            kl = sequence_kl(
                model,
                lambda: reference_of(model, trainer.ref_model),
                batch,
                responses,
                mask,
                temperature=options.temperature,
                estimator="k3",
                clamp=math.inf,
                micro=training.batch_size or 8,
            )
        return torch.stack([scores.float(), kl.float(), mask.sum(dim=1).float()], dim=1)

    was_training = model.training
    model.eval()
    try:
        values = evaluate_prompts(
            prompts[:HELD_OUT_PROMPTS],
            per_batch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            batch_size=training.batch_size or 8,
            seed=(training.seed if training.seed is not None else 42) + 1,
            device=device,
        )
    finally:
        model.train(was_training)
    return summarise(values)


def held_out_metrics(log_history: list[dict], after: HeldOutScores) -> dict[str, float]:
    before = HeldOutScores.from_json(next(entry[HELD_OUT_KEY] for entry in log_history if HELD_OUT_KEY in entry))
    return {
        "reward_mean_first": before.reward,
        "reward_mean_last": after.reward,
        "kl_mean": after.kl,
        "eval_prompts": float(after.prompts),
    }


def logged_metrics(log_history: list[dict[str, float]]) -> dict[str, float]:
    """The training-window metrics, from the rewards and KLs GRPO logged."""
    rewards = [entry["reward"] for entry in log_history if "reward" in entry]
    kls = [entry["kl"] for entry in log_history if "kl" in entry]
    window = max(1, round(FIRST_LAST_FRACTION * len(rewards)))
    return {
        "train_reward_mean_first": sum(rewards[:window]) / window,
        "train_reward_mean_last": sum(rewards[-window:]) / window,
        "train_kl_mean": sum(kls) / len(kls) if kls else 0.0,
    }
