"""PPO throughput: episodes per second and where the time goes (generation, scoring, optimisation).

Runs the real `ppo` recipe loop (one process, no Ray) on a locally built tiny Llama policy, with an untrained reward
model of the same shape (its scores are meaningless; only the cost matters here). Example, from the repository root:

    DS_ACCELERATOR=cpu .venv/bin/python bench/ppo_throughput.py --steps 8 --rollout 16 --max-new-tokens 32

`scoring` covers the no-grad forward passes after generation: policy and reference log-probs, values and reward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from finetune_api.render import render_stage
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import strategy
from finetune_trainer.recipes import ppo
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.tiny_model import write_tiny_model

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="PPO steps to time (after one warm-up step)")
    parser.add_argument("--rollout", type=int, default=16, help="ppo.rolloutBatchSize")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="ppo.maxNewTokens")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="ppo.ppoEpochs")
    parser.add_argument("--hidden", type=int, default=64, help="tiny model width")
    parser.add_argument("--layers", type=int, default=2, help="tiny model depth")
    parser.add_argument("--peft", choices=["lora", "full"], default="lora")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    strategy.single_process_env()
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        root = Path(tmp)
        policy = write_tiny_model(root / "policy", DATA, hidden=args.hidden, layers=args.layers)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        reward_dir = root / "storage" / "rm" / "model"
        AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(reward_dir)
        AutoTokenizer.from_pretrained(policy).save_pretrained(reward_dir)
        spec = FineTuneJobSpec.model_validate(
            {
                "model": {"source": str(policy)},
                "storage": {"uri": str(root / "storage")},
                "peft": {"method": args.peft},
                "deepspeed": {"zeroStage": args.zero_stage},
                "training": {"maxSteps": args.steps + 1, "maxLength": 128, "loggingSteps": 10**6, "saveSteps": 10**6},
                "stages": [
                    {"name": "rm", "type": "reward", "dataset": {"uri": str(DATA / "prefs.jsonl")}},
                    {
                        "name": "ppo",
                        "type": "ppo",
                        "rewardFrom": "rm",
                        "dataset": {"uri": str(DATA / "prompts.jsonl")},
                        "ppo": {
                            "rolloutBatchSize": args.rollout,
                            "maxNewTokens": args.max_new_tokens,
                            "ppoEpochs": args.ppo_epochs,
                            "temperature": 1.0,
                        },
                    },
                ],
            }
        )
        config = render_stage("bench", spec, "ppo")
        loop = ppo.build_loop(StageContext(config, None, rank=0, world_size=1, work_dir=root / "work"))

        loop.plan = dataclasses.replace(loop.plan, total_steps=1)
        loop.run()  # warm-up: first-call allocations and lazy initialisation
        loop.timings = dict.fromkeys(loop.timings, 0.0)
        loop.plan = dataclasses.replace(loop.plan, total_steps=args.steps + 1)
        started = time.perf_counter()
        loop.run()
        # The held-out evaluation after training is not part of the steps' throughput.
        elapsed = time.perf_counter() - started - loop.timings.pop("evaluation")

    episodes = args.steps * args.rollout
    result = {
        "episodes_per_second": episodes / elapsed,
        "seconds_per_step": elapsed / args.steps,
        **{f"{phase}_share": seconds / elapsed for phase, seconds in loop.timings.items()},
        **{f"{phase}_seconds": seconds for phase, seconds in loop.timings.items()},
        "settings": {
            **vars(args),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"PPO throughput: {episodes} episodes in {elapsed:.1f}s = {result['episodes_per_second']:.2f} episodes/s "
        f"({result['seconds_per_step']:.2f}s per step of {args.rollout} prompts x {args.max_new_tokens} new tokens)"
    )
    for phase, seconds in loop.timings.items():
        print(f"  {phase:<13} {seconds:7.2f}s  {100 * seconds / elapsed:5.1f}%")


if __name__ == "__main__":
    main()
