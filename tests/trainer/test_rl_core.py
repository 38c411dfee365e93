"""Golden values for the PPO arithmetic, computed by hand on tiny tensors."""

import math

import pytest
import torch

from finetune_trainer.rl import core
from finetune_trainer.rl.kl import KLController, RunningMoments

pytestmark = pytest.mark.unit


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0
    )


def test_truncation_after_first_stop_token_pads_the_rest():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    truncated, mask = core.truncate_after_stop(responses, stop_token_ids=2, pad_token_id=0)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert core.last_token_index(mask).tolist() == [1, 3, 0]
    assert core.contains_stop(responses, 2).tolist() == [True, False, True]


def test_truncation_stops_at_any_of_several_stop_tokens():
    # eos (2) and a chat template's end of turn (3): a response ends at whichever comes first.
    responses = torch.tensor([[5, 3, 2, 7], [5, 6, 2, 3], [5, 6, 7, 8]])
    truncated, mask = core.truncate_after_stop(responses, stop_token_ids=[2, 3], pad_token_id=0)
    assert truncated.tolist() == [[5, 3, 0, 0], [5, 6, 2, 0], [5, 6, 7, 8]]
    assert core.contains_stop(responses, [2, 3]).tolist() == [True, True, False]


def test_score_lands_on_last_real_token_and_kl_penalty_on_every_real_token():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rewards = core.per_token_rewards(scores, kl, kl_coef=0.5, mask=mask)
    close(rewards, [[-0.05, 1.9, 0.0], [-0.2, -0.25, -1.3]])


def test_gae_with_padding_and_discounting():
    rewards = torch.tensor([[0.5, 1.0, 9.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 7.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    advantages, returns = core.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: deltas 0.5 + 0.9*0.4 - 0.2 = 0.66 and 1.0 - 0.4 = 0.6 (no bootstrap past the last real token).
    close(advantages, [[0.66 + 0.72 * 0.6, 0.6, 0.0], [-0.05 + 0.72 * 0.31, -0.05 + 0.72 * 0.5, 0.5]])
    close(returns, [[1.292, 1.0, 0.0], [0.6732, 0.81, 1.0]])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, -2.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    advantages, returns = core.gae_advantages(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    close(returns, [[2.0, 1.0, 3.0]])
    close(advantages, [[1.5, 0.75, 2.0]])


def test_masked_whitening_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    std = math.sqrt(5.0 / 3.0)  # unbiased variance of 1, 2, 3, 4
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]]
    close(core.masked_whiten(values, mask), expected)
    shifted = core.masked_whiten(values, mask, shift_mean=False)
    close(shifted, [[v + 2.5 for v in expected[0]], [expected[1][0] + 2.5, 0.0, 0.0]])
    assert core.masked_mean(values, mask).item() == pytest.approx(2.5)


def test_kl_estimators_and_clamp():
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    ref_logprobs = torch.tensor([-1.5, -1.0, -30.0])
    close(core.kl_estimate(logprobs, ref_logprobs, "k1", clamp=10.0), [0.5, -1.0, 10.0])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 10.0]
    close(core.kl_estimate(logprobs, ref_logprobs, "k3", clamp=10.0), k3)
    close(core.kl_estimate(ref_logprobs, logprobs, "k1", clamp=10.0), [-0.5, 1.0, -10.0])
    with pytest.raises(ValueError, match="k2"):
        core.kl_estimate(logprobs, ref_logprobs, "k2", clamp=10.0)


def test_clipped_policy_loss_positive_and_negative_advantages():
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), 50.0]])
    mask = torch.tensor([[True, True, False]])
    positive = core.clipped_policy_loss(new, old, torch.tensor([[1.0, 1.0, 1e6]]), mask, clip_range=0.2)
    # ratios 1.5 and 0.5: max(-1.5, -1.2) = -1.2 and max(-0.5, -0.8) = -0.5.
    close(positive.loss, -0.85)
    close(positive.clipfrac, 0.5)
    close(positive.approx_kl, 0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))
    negative = core.clipped_policy_loss(new, old, torch.tensor([[-1.0, -1.0, 1e6]]), mask, clip_range=0.2)
    close(negative.loss, (1.5 + 0.8) / 2)
    close(negative.clipfrac, 0.5)


def test_clipped_value_loss():
    values = torch.tensor([[1.0, 0.0, 0.6, 123.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    result = core.clipped_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # Clipped predictions 0.7, 0.3, 0.6 -> squared errors max(1.0, 1.69), max(0.0, 0.09), max(1.96, 1.96).
    close(result.loss, 0.5 * (1.69 + 0.09 + 1.96) / 3)
    close(result.clipfrac, 2 / 3)


def test_logprobs_and_entropy_use_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    close(core.logprobs_of(logits, tokens, temperature=1.0), [[math.log(0.75)]])
    close(core.logprobs_of(logits, tokens, temperature=0.5), [[math.log(0.9)]])
    close(core.entropy_of(torch.zeros(1, 1, 4), temperature=0.7), [[math.log(4.0)]])


def test_adaptive_kl_controller_follows_ziegler_update():
    controller = KLController(value=0.1, target=6.0, horizon=10000)
    controller.update(kl=9.0, episodes=1000)  # error clipped to +0.2 -> beta *= 1.02
    assert controller.value == pytest.approx(0.102)
    controller.update(kl=5.4, episodes=1000)  # error -0.1 -> beta *= 0.99
    assert controller.value == pytest.approx(0.102 * 0.99)
    fixed = KLController(value=0.05)
    fixed.update(kl=100.0, episodes=1000)
    assert fixed.value == 0.05
    restored = KLController(value=0.05, target=6.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_running_moments_merge_batches():
    moments = RunningMoments()
    moments.update(batch_mean=2.0, batch_var=4.0, batch_count=10)
    assert (moments.mean, moments.var) == pytest.approx((2.0, 4.0))
    moments.update(batch_mean=4.0, batch_var=0.0, batch_count=10)
    assert (moments.mean, moments.var) == pytest.approx((3.0, 3.0))


def test_score_shaping_penalises_missing_eos_then_normalises_then_clips():
    from pathlib import Path

    from finetune_api.spec import PPOOptions, TrainingSpec
    from finetune_trainer.rl.loop import PPOLoop, PPOPlan

    options = PPOOptions(missing_eos_penalty=1.0, normalize_reward=True, reward_clip=1.0)
    loop = PPOLoop(
        stage="ppo",
        options=options,
        training=TrainingSpec(),
        plan=PPOPlan(1, 4, 4, 4, 1),
        policy=None,
        value=None,
        reference=None,
        reward=None,
        tokenizer=None,
        stop_token_ids=[2],
        prompts=[],
        eval_prompts=[],
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        checkpoint_root=Path("."),
        hooks=None,
    )
    scores = loop.shape_scores(torch.tensor([3.0, 1.0, 2.0, 6.0]), finished=torch.tensor([True, True, True, False]))
    # Penalised: [3, 1, 2, 5]; running mean 2.75 and (population) std sqrt(2.1875); then clipped to +-1.
    std = math.sqrt(2.1875)
    close(scores, [0.25 / std, -1.0, -0.75 / std, 1.0])
    assert loop.state.score_moments.mean == pytest.approx(2.75)


def test_held_out_shares_cover_every_prompt_once_and_pad_to_equal_lengths():
    from finetune_trainer.rl.evaluation import rank_share

    for count, world in [(10, 1), (10, 2), (7, 2), (7, 3), (2, 4)]:
        shares = [rank_share(count, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # the same number of forward passes on every worker
        per_worker = len(shares[0])
        # Interleaved back (row i of worker r is prompt i * world + r), the first `count` rows are the prompts in order.
        interleaved = [shares[rank][i] for i in range(per_worker) for rank in range(world)]
        assert interleaved[:count] == list(range(count))


def test_held_out_sampling_is_seeded_and_leaves_the_random_state_alone():
    from finetune_trainer.rl.evaluation import evaluate_prompts

    def per_batch(batch):
        return torch.rand(len(batch), 1)

    def run():
        return evaluate_prompts(
            list("abcde"), per_batch, rank=0, world_size=1, batch_size=2, seed=3, device=torch.device("cpu")
        )

    torch.manual_seed(0)
    first = run()
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.testing.assert_close(run(), first)
    torch.testing.assert_close(torch.rand(1), after)
