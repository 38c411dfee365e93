"""PPO and GRPO stages on a toy task whose reward model prefers digit tokens in the response.

The reward model is a real AutoModelForSequenceClassification, trained here for a few seconds on pairs where the
chosen response holds more digit tokens, saved to disk and loaded by the stage like any `rewardFrom` output.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from stage_helpers import mlflow_runs

from finetune_api.render import StageConfig, render_stage
from finetune_api.spec import FineTuneJobSpec, ResourcesSpec
from finetune_trainer.errors import ConfigError, KLLimitError
from finetune_trainer.reporting import FileReporter
from finetune_trainer.rl import loop as ppo_loop
from finetune_trainer.stage import run_stage
from finetune_trainer.tiny_model import write_tiny_model

pytestmark = pytest.mark.train

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@dataclass(frozen=True)
class Toy:
    policy: Path
    reward: Path
    digit_ids: tuple[int, ...]


def _peaked_policy(directory: Path) -> None:
    """A random-init model predicts near-uniform tokens (tiny logits) that LoRA can barely reshape; scaling the final
    norm gives the peaked next-token distribution of a trained model, which adapters can move within seconds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(directory)


def _train_digit_reward_model(policy: Path, out: Path, steps: int = 150) -> tuple[int, ...]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    vocab = tokenizer.get_vocab().values()
    digits = sorted(i for i in vocab if tokenizer.decode([i]).strip().isdigit())
    others = sorted(i for i in vocab if i not in digits and i not in tokenizer.all_special_ids)
    prompts = [json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    torch.manual_seed(0)
    # A response ends at eos or at the chat template's end of turn (the policy stops at either), so the toy reward
    # model sees both endings.
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def response(n_digits: int, length: int) -> list[int]:
        ids = [rng.choice(others) for _ in range(length)]
        for position in rng.sample(range(length), n_digits):
            ids[position] = rng.choice(digits)
        return ids

    def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return ids, mask

    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        chosen, rejected = [], []
        for _ in range(32):
            length = rng.randint(2, 8)
            fewer, more = sorted(rng.sample(range(length + 1), 2))
            prompt = tokenizer(rng.choice(prompts))["input_ids"]
            chosen.append(prompt + response(more, length) + [rng.choice(stops)])
            # Some rejected responses are empty, so that stopping at once is not a way to please the model.
            rejected.append(prompt + ([] if rng.random() < 0.2 else response(fewer, length)) + [rng.choice(stops)])
        scores = model(*padded(chosen + rejected)).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(scores[:32] - scores[32:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return tuple(digits)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Toy:
    root = tmp_path_factory.mktemp("rl-toy")
    policy = write_tiny_model(root / "policy", DATA)
    digit_ids = _train_digit_reward_model(policy, root / "reward")
    _peaked_policy(policy)
    return Toy(policy=policy, reward=root / "reward", digit_ids=digit_ids)


@torch.no_grad()
def digit_mass(model_dir: Path, toy: Toy) -> float:
    """Mean next-token probability of digit tokens over sampled responses to the example prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.architectures == ["LlamaForCausalLM"]
    prompts = [json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").read_text().splitlines()[:32]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    sequences = model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    logits = model(sequences, attention_mask=(sequences != tokenizer.pad_token_id).long()).logits
    probs = logits[:, batch["input_ids"].shape[1] - 1 : -1].softmax(-1)
    return probs[..., list(toy.digit_ids)].sum(-1).mean().item()


def stage_config(
    toy: Toy,
    root: Path,
    stage_type: str = "ppo",
    options: dict | None = None,
    training: dict | None = None,
    peft: dict | None = None,
    deepspeed: dict | None = None,
    reward: Path | None = None,
    attempt: int = 1,
    prompts: Path = DATA / "prompts.jsonl",
    validation: Path | None = None,
) -> StageConfig:
    """A [reward -> ppo|grpo] job whose reward stage output is the toy reward model, rendered for the RL stage."""
    storage = root / "storage"
    if not (storage / "rm" / "model").exists():
        shutil.copytree(reward or toy.reward, storage / "rm" / "model")
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": str(toy.policy)},
            "storage": {"uri": str(storage)},
            "peft": peft or {"method": "lora"},
            "deepspeed": deepspeed or {},
            "training": {
                "learningRate": 3e-3,
                "warmupRatio": 0.0,
                "lrScheduler": "constant",
                "maxLength": 64,
                "loggingSteps": 5,
                **(training or {}),
            },
            "stages": [
                {"name": "rm", "type": "reward", "dataset": {"uri": str(DATA / "prefs.jsonl")}},
                {
                    "name": "rl",
                    "type": stage_type,
                    "rewardFrom": "rm",
                    "dataset": {"uri": str(prompts), **({"validationUri": str(validation)} if validation else {})},
                    stage_type: options or {},
                },
            ],
        }
    )
    config = render_stage("toy", spec, "rl", attempt=attempt)
    assert config.input_model == str(toy.policy)  # the policy chain skips the reward stage
    return config


PPO_TOY = {"rolloutBatchSize": 16, "miniBatches": 2, "ppoEpochs": 2, "maxNewTokens": 8, "temperature": 1.0}


def test_ppo_raises_the_reward_model_score_within_the_kl_limit(toy, tmp_path):
    config = stage_config(
        toy, tmp_path, options={**PPO_TOY, "maxKl": 40.0}, training={"maxSteps": 20, "learningRate": 5e-3}
    )
    report = tmp_path / "report.json"
    metrics = run_stage(config, FileReporter(report, min_interval=0.0), use_ray=False)

    assert metrics["ppo_steps"] == 20 and metrics["eval_prompts"] == 10  # the 10% held out of 100 prompts
    # On the held-out prompts, the trained policy scores higher than the input policy, at a positive KL.
    assert metrics["reward_mean_last"] > metrics["reward_mean_first"] + 3.0, metrics  # observed: -9.1 -> 8.8, kl 29.7
    assert 0 < metrics["kl_mean"] < 40.0
    assert metrics["train_reward_mean_last"] > metrics["train_reward_mean_first"] + 3.0, (
        metrics
    )  # observed: -10.9 -> -4.2
    assert 0 < metrics["kl_last"] < 40.0
    final = json.loads(report.read_text())
    assert final["phase"] == "Succeeded" and final["step"] == 20 and final["totalSteps"] == 20
    # The final report holds the stage's results, not the last step's progress stats.
    assert final["metrics"] == metrics
    # The saved policy (adapters merged into a plain causal LM) puts more probability on the rewarded tokens.
    assert digit_mass(Path(config.output_uri), toy) > digit_mass(toy.policy, toy) + 0.05


def test_ppo_logs_reward_kl_and_its_rollouts_throughput_to_metrics_jsonl_and_the_trackers(
    toy, tmp_path, monkeypatch, mlflow_store
):
    import itertools

    from finetune_trainer import reporting

    # A clock one second further on each time it is read: tokens/s is then the tokens trained since the last log.
    monkeypatch.setattr(ppo_loop, "TokenRate", lambda: reporting.TokenRate(clock=itertools.count().__next__))
    prompt_tokens = []
    real_encode, real_evaluate = ppo_loop.encode_prompts, ppo_loop.PPOLoop.evaluate_held_out
    evaluating = []

    def encode_counting(*args):
        batch = real_encode(*args)
        if not evaluating:  # the rollouts' prompts, not the held-out evaluation's
            prompt_tokens.append(int(batch.attention_mask.sum()))
        return batch

    def evaluate_uncounted(self, when):
        evaluating.append(when)
        try:
            return real_evaluate(self, when)
        finally:
            evaluating.pop()

    monkeypatch.setattr(ppo_loop, "encode_prompts", encode_counting)
    monkeypatch.setattr(ppo_loop.PPOLoop, "evaluate_held_out", evaluate_uncounted)
    options = {"rolloutBatchSize": 8, "miniBatches": 2, "maxNewTokens": 6, "temperature": 1.0}
    training = {"maxSteps": 3, "loggingSteps": 1, "reportTo": ["mlflow", "tensorboard"]}
    config = stage_config(toy, tmp_path, options=options, training=training)
    report = tmp_path / "report.json"
    run_stage(config, FileReporter(report, min_interval=0.0), use_ray=False)

    stage_dir = tmp_path / "storage" / "rl"
    logged = [row for row in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "kl" in row]
    assert [row["step"] for row in logged] == [1, 2, 3]
    # Each rollout's prompt tokens and response tokens (8 responses of `response_length` on average), padding aside.
    assert [row["tokens_per_second"] for row in logged] == pytest.approx(
        [prompts + 8 * row["response_length"] for prompts, row in zip(prompt_tokens, logged)]
    )
    assert json.loads(report.read_text())["tokensPerSecond"] == pytest.approx(logged[-1]["tokens_per_second"])

    client, runs = mlflow_runs(mlflow_store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in ("score", "kl", "loss", "tokens_per_second"):
        history = client.get_metric_history(runs[0].info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(row["step"], pytest.approx(row[key])) for row in logged], key
    events = list((stage_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert any(b"train/score" in event.read_bytes() and b"train/kl" in event.read_bytes() for event in events)


def test_ppo_kl_gate_aborts_with_measured_and_allowed_kl(toy, tmp_path):
    config = stage_config(
        toy, tmp_path, options={**PPO_TOY, "maxKl": 0.01}, training={"maxSteps": 6, "learningRate": 1e-2}
    )
    with pytest.raises(KLLimitError, match=r"mean KL to the reference \d+\.\d+ exceeds ppo.maxKl 0.01") as failure:
        run_stage(config, None, use_ray=False)
    assert failure.value.reason == "KLLimitExceeded" and failure.value.permanent
    assert not Path(config.output_uri).exists()


def test_ppo_resume_replays_the_uninterrupted_run(toy, tmp_path, monkeypatch):
    options = {
        "rolloutBatchSize": 8,
        "miniBatches": 2,
        "maxNewTokens": 6,
        "temperature": 1.0,
        "klTarget": 1.0,
        "klHorizon": 100,
    }
    training = {"maxSteps": 4, "saveSteps": 2}
    straight = run_stage(
        stage_config(toy, tmp_path / "straight", options=options, training=training), None, use_ray=False
    )

    interrupted = stage_config(toy, tmp_path / "interrupted", options=options, training=training)
    real_optimise = ppo_loop.PPOLoop.optimise

    def crash_on_third_step(self, rollout, step):
        if step == 2:
            raise RuntimeError("worker lost")
        return real_optimise(self, rollout, step)

    monkeypatch.setattr(ppo_loop.PPOLoop, "optimise", crash_on_third_step)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_stage(interrupted, None, use_ray=False)
    checkpoint = Path(interrupted.checkpoint_dir) / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "policy" / "engine.pt").is_file()
    assert (
        json.loads((checkpoint / "trainer_state.json").read_text())["kl_controller"]["value"] != 0.05
    )  # adaptive beta moved

    monkeypatch.setattr(ppo_loop.PPOLoop, "optimise", real_optimise)
    resumed = run_stage(interrupted.model_copy(update={"attempt": 2}), None, use_ray=False)
    assert resumed == pytest.approx(straight, rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ppo_under_deepspeed_zero_with_lora_resumes_exactly(toy, tmp_path, zero_stage):
    options = {"rolloutBatchSize": 8, "miniBatches": 2, "maxNewTokens": 6, "temperature": 1.0, "klEstimator": "k3"}
    config = stage_config(
        toy, tmp_path, options=options, training={"maxSteps": 3, "saveSteps": 2}, deepspeed={"zeroStage": zero_stage}
    )
    first = run_stage(config, None, use_ray=False)
    assert first["ppo_steps"] == 3 and first["kl_last"] > 0
    assert list((Path(config.checkpoint_dir) / "checkpoint-2" / "policy" / "engine").glob("*model_states.pt"))
    assert (Path(config.output_uri) / "config.json").is_file()
    # A second attempt resumes from the DeepSpeed checkpoint-2 and replays step 3 exactly.
    assert run_stage(config.model_copy(update={"attempt": 2}), None, use_ray=False) == pytest.approx(
        first, rel=1e-4, abs=1e-5
    )


@pytest.mark.slow
def test_ppo_on_two_ray_workers_with_zero3(toy, tmp_path):
    # k3 is never negative, so a policy that moved shows a positive KL (k1 can dip below zero on a small sample).
    options = {"rolloutBatchSize": 8, "miniBatches": 2, "maxNewTokens": 6, "temperature": 1.0, "klEstimator": "k3"}
    config = stage_config(
        toy, tmp_path, options=options, training={"maxSteps": 2, "saveSteps": 1}, deepspeed={"zeroStage": 3}
    ).model_copy(update={"resources": ResourcesSpec(workers=2)})
    metrics = run_stage(config, None, use_ray=True)
    assert metrics["ppo_steps"] == 2 and metrics["kl_last"] > 0
    assert metrics["eval_prompts"] == 10  # each held-out prompt once, though both workers evaluated a share
    # Each worker rolled out 4 prompts, averaged its statistics with the other and saved its own optimizer shard.
    shards = Path(config.checkpoint_dir) / "checkpoint-1" / "policy" / "engine"
    assert sorted(p.name for p in shards.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (Path(config.output_uri) / "config.json").is_file()


def test_ppo_with_a_reward_model_on_another_tokenizer(toy, tmp_path):
    """An extra special token makes the reward tokenizer differ: responses are decoded and re-tokenized for scoring."""
    from transformers import AutoTokenizer

    reward = tmp_path / "reward-own-tokenizer"
    shutil.copytree(toy.reward, reward)
    tokenizer = AutoTokenizer.from_pretrained(reward)
    tokenizer.add_tokens(["<|reward|>"], special_tokens=True)
    tokenizer.save_pretrained(reward)

    options = {"rolloutBatchSize": 8, "maxNewTokens": 6, "temperature": 1.0}
    with pytest.raises(
        ConfigError, match="valueInit 'reward' needs the reward model .* to share the policy's tokenizer"
    ):
        run_stage(stage_config(toy, tmp_path / "a", options=options, reward=reward), None, use_ray=False)
    config = stage_config(
        toy, tmp_path / "b", options={**options, "valueInit": "policy"}, training={"maxSteps": 2}, reward=reward
    )
    metrics = run_stage(config, None, use_ray=False)
    assert (
        metrics["ppo_steps"] == 2 and metrics["reward_mean_first"] < 0
    )  # the toy model scores digit-poor text negative


def test_grpo_raises_the_reward_model_score(toy, tmp_path):
    config = stage_config(
        toy,
        tmp_path,
        stage_type="grpo",
        options={"numGenerations": 4, "maxNewTokens": 8, "beta": 0.04},
        training={"maxSteps": 20, "batchSize": 16, "learningRate": 5e-3, "loggingSteps": 1},
    )
    metrics = run_stage(config, None, use_ray=False)
    assert set(metrics) == {
        "reward_mean_first",
        "reward_mean_last",
        "kl_mean",
        "eval_prompts",
        "train_reward_mean_first",
        "train_reward_mean_last",
        "train_kl_mean",
    }
    assert metrics["eval_prompts"] == 10 and metrics["kl_mean"] > 0 and metrics["train_kl_mean"] > 0
    # On the held-out prompts, the trained (final) policy scores higher than the input policy. At learning rate 1e-2
    # the training rewards rose as well but the last updates undid it, which only the held-out evaluation shows.
    assert metrics["reward_mean_last"] > metrics["reward_mean_first"] + 3.0, metrics  # observed: -9.6 -> 10.4, kl 45.9
    assert metrics["train_reward_mean_last"] > metrics["train_reward_mean_first"] + 3.0, (
        metrics
    )  # observed: -9.4 -> 9.3
    assert digit_mass(Path(config.output_uri), toy) > digit_mass(toy.policy, toy) + 0.05


def test_grpo_on_conversational_prompts(toy, tmp_path):
    # Chat prompts: TRL hands the reward function each completion as a list of assistant messages.
    prompts = tmp_path / "chat-prompts.jsonl"
    with prompts.open("w") as out:
        for line in (DATA / "prompts.jsonl").read_text().splitlines()[:64]:
            out.write(json.dumps({"prompt": [{"role": "user", "content": json.loads(line)["prompt"]}]}) + "\n")
    config = stage_config(
        toy,
        tmp_path,
        stage_type="grpo",
        options={"numGenerations": 4, "maxNewTokens": 6},
        training={"maxSteps": 3, "batchSize": 8, "loggingSteps": 1},
        prompts=prompts,
    )
    metrics = run_stage(config, None, use_ray=False)
    assert {"reward_mean_first", "reward_mean_last", "kl_mean", "train_reward_mean_first"} <= set(metrics)
    assert metrics["eval_prompts"] == 7  # the 10% held out of 64 prompts
    assert (Path(config.output_uri) / "config.json").is_file()


@pytest.mark.parametrize(
    ("stage_type", "options", "training"),
    [
        ("ppo", {"rolloutBatchSize": 4, "maxNewTokens": 4, "temperature": 1.0}, {"maxSteps": 2}),
        ("grpo", {"numGenerations": 2, "maxNewTokens": 4}, {"maxSteps": 2, "batchSize": 4}),
    ],
)
def test_rl_held_out_metrics_score_the_held_out_prompts_before_and_after_training(
    toy, tmp_path, monkeypatch, stage_type, options, training
):
    from finetune_trainer.recipes import grpo

    held_out = [f"Held-out question {i}: what is {i} times {i}?" for i in range(5)]
    validation = tmp_path / "held-out.jsonl"
    validation.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in held_out))
    train = [json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").read_text().splitlines()]
    assert not set(held_out) & set(train)

    evaluations = []  # per evaluation: the prompts scored, and the per-prompt (reward, kl, length) rows
    module = ppo_loop if stage_type == "ppo" else grpo
    real_evaluate = module.evaluate_prompts

    def recording(prompts, per_batch, **kwargs):
        scored, rows = [], []

        def per_batch_recorded(batch):
            scored.extend(batch)
            rows.append(per_batch(batch))
            return rows[-1]

        values = real_evaluate(prompts, per_batch_recorded, **kwargs)
        evaluations.append((scored, torch.cat(rows)))
        return values

    monkeypatch.setattr(module, "evaluate_prompts", recording)
    config = stage_config(
        toy, tmp_path, stage_type=stage_type, options=options, training=training, validation=validation
    )
    metrics = run_stage(config, None, use_ray=False)

    # Evaluated twice (input policy, trained policy), each time on every held-out prompt once and on nothing else.
    assert [scored for scored, _ in evaluations] == [held_out, held_out]
    assert metrics["eval_prompts"] == len(held_out)
    (_, before), (_, after) = evaluations
    assert metrics["reward_mean_first"] == pytest.approx(before[:, 0].mean().item())
    assert metrics["reward_mean_last"] == pytest.approx(after[:, 0].mean().item())
    assert metrics["kl_mean"] == pytest.approx(after[:, 1].mean().item())
    # Before training the policy is its own reference (LoRA's adapter starts at zero): no KL yet; after, some.
    assert before[:, 1].abs().max().item() < 1e-5 < after[:, 1].abs().max().item()
    assert 1 <= after[:, 2].min().item() and after[:, 2].max().item() <= 4  # completions of at most maxNewTokens


def test_reward_scores_agree_with_and_without_retokenizing(toy):
    """The same (prompt, response) scored from the policy's token ids and from re-tokenized text gives the same score,
    so the score is read at the same (last) token in both paths, eos included only when the response finished."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune_trainer.rl.core import contains_stop, truncate_after_stop
    from finetune_trainer.rl.models import TokenScorer, freeze
    from finetune_trainer.rl.rollout import RewardScorer, encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(toy.reward)
    other = AutoTokenizer.from_pretrained(toy.reward)
    other.add_tokens(["<|reward|>"], special_tokens=True)
    model = freeze(TokenScorer(AutoModelForSequenceClassification.from_pretrained(toy.reward)))
    direct, retokenized = RewardScorer(model, tokenizer, tokenizer, 64, 2), RewardScorer(model, other, tokenizer, 64, 2)
    assert not direct.retokenize and retokenized.retokenize

    batch = encode_prompts(tokenizer, ["What is 3 plus 4?", "How much is 12 plus 1?"], max_prompt_tokens=32)
    finished = tokenizer(" 7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    unfinished = tokenizer(" 13 13 13", add_special_tokens=False)["input_ids"]  # used the whole token budget
    assert len(finished) < len(unfinished)
    # Tokens sampled after eos are junk that truncation must drop.
    finished += [toy.digit_ids[0]] * (len(unfinished) - len(finished))
    responses, mask = truncate_after_stop(
        torch.tensor([finished, unfinished]), tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    done = contains_stop(responses, tokenizer.eos_token_id)
    assert done.tolist() == [True, False] and mask.sum(dim=1).tolist() == [2, len(unfinished)]

    scores = direct(batch, responses, mask, done)
    torch.testing.assert_close(retokenized(batch, responses, mask, done), scores, atol=1e-4, rtol=0)
    assert retokenized.reward_texts(batch.prompts, responses, mask, done) == [
        "What is 3 plus 4? 7</s>",
        "How much is 12 plus 1? 13 13 13",
    ]


def _evaluate_on_two_workers(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from finetune_trainer.rl.evaluation import evaluate_prompts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        prompts = [f"prompt {i}" for i in range(7)]
        seen = []

        def per_batch(batch):
            seen.extend(batch)
            # Each prompt's index and the worker that scored it.
            return torch.tensor([[float(p.split()[1]), float(rank)] for p in batch])

        values = evaluate_prompts(
            prompts, per_batch, rank=rank, world_size=2, batch_size=3, seed=0, device=torch.device("cpu")
        )
        torch.save({"values": values, "seen": seen}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_held_out_evaluation_counts_every_prompt_once_over_two_workers(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_evaluate_on_two_workers, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    # Worker 0 scored prompts 0, 2, 4, 6; worker 1 scored 1, 3, 5 and repeated 0 to match worker 0's share.
    assert [r["seen"] for r in results] == [
        ["prompt 0", "prompt 2", "prompt 4", "prompt 6"],
        ["prompt 1", "prompt 3", "prompt 5", "prompt 0"],
    ]
    for result in results:  # both workers end with every prompt once, in order, the repeat dropped
        expected = torch.tensor([[i, i % 2] for i in range(7)], dtype=torch.float64)
        torch.testing.assert_close(result["values"], expected)
