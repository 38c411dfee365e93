"""SFT training throughput: our sft stage vs a bare TRL SFTTrainer script, and packing vs padding.

    DS_ACCELERATOR=cpu .venv/bin/python bench/sft_throughput.py [--steps 60] [--repeats 2]

Same tiny model, data (examples/data/instruct.jsonl), batch size, sequence length and steps in every run. Tokens/s is
TRL's `num_tokens` (non-padding tokens seen) divided by the wall time of `trainer.train()`, timed the same way for both
sides by wrapping SFTTrainer.train. Our stage's train() includes its one start-of-training evaluation. Runs alternate
(bare, ours, bare, ours, ...) and the best run of each kind counts, to damp noise from other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
TIMINGS: list[dict] = []


def instrument_sft_trainer() -> None:
    import trl

    original = trl.SFTTrainer.train

    def timed_train(self, *args, **kwargs):
        started = time.perf_counter()
        result = original(self, *args, **kwargs)
        seconds = time.perf_counter() - started
        tokens = max((entry.get("num_tokens", 0) for entry in self.state.log_history), default=0)
        TIMINGS.append({"seconds": seconds, "tokens": tokens, "steps": self.state.global_step})
        return result

    trl.SFTTrainer.train = timed_train


def bare_trl(model_dir: Path, out: Path, steps: int, batch_size: int, max_length: int, packing: bool) -> dict:
    """What a user would write by hand: SFTTrainer on the same rows, same hyper-parameters, no checkpoints."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (DATA / "instruct.jsonl").read_text().splitlines()]
    split = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=42)
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        packing=packing,
        learning_rate=2e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=42,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=split["train"],
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return TIMINGS[-1]


def our_stage(model_dir: Path, out: Path, steps: int, batch_size: int, max_length: int, packing: bool) -> dict:
    from finetune_api.render import render_stage
    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer.stage import run_stage

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": str(model_dir)},
            "storage": {"uri": str(out)},
            "peft": {"method": "full"},
            "training": {
                "maxSteps": steps,
                "batchSize": batch_size,
                "maxLength": max_length,
                "packing": packing,
                "learningRate": 2e-3,
                "loggingSteps": 10,
                "saveSteps": steps * 10,
            },
            "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}}],
        }
    )
    run_stage(render_stage("bench", spec, "sft"), None, use_ray=False)
    return TIMINGS[-1]


def tokens_per_second(timing: dict) -> float:
    return timing["tokens"] / timing["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from finetune_trainer.tiny_model import write_tiny_model

    instrument_sft_trainer()
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    model_dir = write_tiny_model(work / "tiny", DATA)
    shape = (args.steps, args.batch_size, args.max_length)
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for label, runner, packing in (
            ("bare TRL", bare_trl, False),
            ("our stage", our_stage, False),
            ("our stage, packing", our_stage, True),
        ):
            timing = runner(model_dir, work / f"{label.replace(' ', '-').replace(',', '')}-{repeat}", *shape, packing)
            rate = tokens_per_second(timing)
            best[label] = max(best.get(label, 0.0), rate)
            print(
                f"run {repeat + 1}: {label:20s} {timing['tokens']:7.0f} tokens in {timing['seconds']:6.2f}s = {rate:8.0f} tokens/s",
                file=sys.stderr,
            )
    print(
        f"\nSFT throughput, {args.steps} steps x batch {args.batch_size}, max length {args.max_length}, best of {args.repeats}:"
    )
    for label, rate in best.items():
        print(f"  {label:20s} {rate:8.0f} tokens/s")
    print(f"  ratio our stage / bare TRL:      {best['our stage'] / best['bare TRL']:.3f} (goal >= 0.95)")
    print(f"  ratio packing / padding (ours):  {best['our stage, packing'] / best['our stage']:.3f}")


if __name__ == "__main__":
    main()
