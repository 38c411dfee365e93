"""GRPO (TRL's GRPOTrainer) with the pipeline's reward model as the reward function.

Each prompt gets `numGenerations` completions; their advantages are the scores relative to the group, so no value
model is needed. The `rewardFrom` model scores every (prompt, completion) on its own tokenizer (the completions arrive as
text). Data: `prompt` rows (text or chat messages). Status metrics: reward_mean_first / reward_mean_last (mean reward
over the first / last 20% of logged steps), kl_mean (mean logged KL to the reference; 0 when beta is 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from trl import GRPOConfig, GRPOTrainer

from finetune_api.spec import GRPOOptions
from finetune_trainer.errors import ConfigError
from finetune_trainer.modeling import stop_token_ids
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.rl.loop import FIRST_LAST_FRACTION
from finetune_trainer.rl.models import TokenScorer, freeze
from finetune_trainer.rl.rollout import RewardScorer, reward_text

ACCEPTED_COLUMNS = [("prompt",)]


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
        eval_on_start=False,  # the training rewards are the learning signal; a held-out pass would only add generation time
    )
    trainer = GRPOTrainer(
        model=ctx.causal_lm(),
        reward_funcs=reward_function(scorer, stop_token_ids(tokenizer), device),
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())
    metrics = logged_metrics(trainer.state.log_history)
    ctx.log(
        "GRPO done: reward {reward_mean_first:.3f} -> {reward_mean_last:.3f}, kl_mean {kl_mean:.4f}".format(**metrics)
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


def logged_metrics(log_history: list[dict[str, float]]) -> dict[str, float]:
    rewards = [entry["reward"] for entry in log_history if "reward" in entry]
    kls = [entry["kl"] for entry in log_history if "kl" in entry]
    window = max(1, round(FIRST_LAST_FRACTION * len(rewards)))
    return {
        "reward_mean_first": sum(rewards[:window]) / window,
        "reward_mean_last": sum(rewards[-window:]) / window,
        "kl_mean": sum(kls) / len(kls) if kls else 0.0,
    }
