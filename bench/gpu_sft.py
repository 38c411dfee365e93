"""GPU SFT throughput and MFU: our sft stage (one process, no Ray) vs a bare TRL SFTTrainer script, full and LoRA.

    python bench/gpu_sft.py [--steps 30] [--warmup-steps 5] [--batch-size 8] [--json results.json]   # one GPU
    DS_ACCELERATOR=cpu python bench/gpu_sft.py --toy [--json results.json]                          # CPU, seconds

A random-init Llama-shaped model (hidden 2048, 16 layers, 16 heads, intermediate 5632, vocabulary 32000: ~0.95B
parameters) and its tokenizer are built locally (nothing is downloaded), with a synthetic prompt/completion dataset
drawn from examples/data/domain.txt, long enough for every step to take `--batch-size` packed sequences of
`--max-length` (2048) tokens. Both configurations, full fine-tuning and LoRA (r 8, all linear layers), run on both
sides with the same model, rows, batch, sequence length, steps, precision (bf16 autocast; full fine-tuning keeps fp32
master weights as our stage does, LoRA's frozen base loads in bf16), optimizer, schedule and seed, packing on (TRL's
best-fit-decreasing packing, padding-free), gradient checkpointing off unless `--gradient-checkpointing`.

Our side is the stage entrypoint's in-process path (`finetune_trainer.stage.run_stage(..., use_ray=False)`, what
`--no-ray` runs), as bench/sft_throughput.py drives it; the bare side is the SFTTrainer script a user would write. Both
are timed the same way, from a callback added to SFTTrainer.train: from the end of step `--warmup-steps` to the end of
the last step (the device synchronised at both marks), tokens being TRL's non-padding `num_input_tokens_seen` over
the same steps. Our stage's held-out evaluation before training and its final evaluation and save are outside that
window. Attention: `sdpa`, and also `flash_attention_2` when the flash-attn package is importable (on a GPU).

Without a GPU (or with `--toy`) the same runs happen at a tiny size on the CPU in fp32; MFU is then None unless
`--peak-tflops` is given.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
# This checkout's packages, also when the venv's editable install points at another checkout (or none).
for _room in ("trainer", "api"):
    if str(REPO / _room) not in sys.path:
        sys.path.insert(0, str(REPO / _room))


SEED = 42
CONFIGS = ("full", "lora")
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
LEARNING_RATE = {"full": 2e-5, "lora": 2e-4}  # the sft stage's defaults, set explicitly on both sides
FULL_MFU_GOAL = 0.45
TIMINGS: list[dict] = []

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets. First match of the device
# name wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),  # not on NVIDIA's data sheets: pass --peak-tflops
    ("A10", 125.0),
)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # the model's embedding rows; the tokenizer's own vocabulary may be smaller
    max_length: int
    batch_size: int


GPU_SHAPE = Shape(hidden=2048, layers=16, heads=16, kv_heads=16, intermediate=5632, vocab=32000, max_length=2048,
                  batch_size=8)  # fmt: skip
TOY_SHAPE = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=0, max_length=128, batch_size=2)


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


# ---- FLOPs ----------------------------------------------------------------------------------------------------------
# Model FLOPs per trained token (the PaLM appendix-B convention, no recomputation counted):
#   full fine-tuning:  6 * N + 12 * layers * hidden * seq
#   LoRA:              4 * N_frozen + 6 * N_lora + 12 * layers * hidden * seq
# N is every parameter but the input embedding (a lookup, no FLOPs): the matmul weights, the untied LM head included,
# and the norm weights (negligible). A trained weight costs 2 FLOPs per token forward, 2 for the activation gradient and 2 for its own gradient;
# LoRA's frozen base still does the forward and the backward through the activations (to reach the adapters of lower
# layers) but no weight gradient, hence 4 * N_frozen, while the adapters (N_lora, A and B of every linear layer but
# the head) cost the full 6. The attention term is QK^T and AV (2 * 2 * seq * hidden per token and layer forward,
# three times that with the backward), with seq the packed length `--max-length`, counted over the full (not causal,
# not per-document) square as the convention does; it is the same for LoRA since attention has no weights. Gradient
# checkpointing's recomputed forward is not counted (model FLOPs, not hardware FLOPs).


def parameter_counts(model) -> dict[str, int]:
    """Matmul parameters of a (possibly PEFT-wrapped) causal LM: trained and frozen, without the input embedding."""
    embedding = model.get_input_embeddings().weight
    trained = frozen = 0
    for parameter in model.parameters():
        if parameter is embedding:
            continue
        if parameter.requires_grad:
            trained += parameter.numel()
        else:
            frozen += parameter.numel()
    return {"trained": trained, "frozen": frozen}


def flops_per_token(counts: dict[str, int], shape: Shape) -> float:
    attention = 12 * shape.layers * shape.hidden * shape.max_length
    return 6 * counts["trained"] + 4 * counts["frozen"] + attention


def count_parameters(model_dir: Path) -> dict[str, dict[str, int]]:
    """Parameter counts per configuration, from the model built on the meta device (no memory, no weights)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune_api.spec import PeftSpec
    from finetune_trainer.modeling import lora_config

    config = AutoConfig.from_pretrained(model_dir)
    counts = {}
    for name in CONFIGS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        if name == "lora":
            model = get_peft_model(model, lora_config(PeftSpec(method="lora", **LORA)))
        counts[name] = parameter_counts(model)
    full = counts["full"]
    counts["full"] = {"trained": full["trained"] + full["frozen"], "frozen": 0}
    return counts


# ---- model and data -------------------------------------------------------------------------------------------------
def write_model(out: Path, shape: Shape, gpu: bool) -> Shape:
    """Tokenizer (the repository's offline BPE) and a random-init Llama of `shape`, saved in bf16 (fp32 on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(DATA)
    vocab = max(shape.vocab, len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(2048, shape.max_length),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(config)
    if gpu:
        model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    del model
    _free_memory()
    return Shape(**{**asdict(shape), "vocab": vocab})


def write_dataset(out: Path, model_dir: Path, shape: Shape, tokens_needed: int) -> dict[str, int]:
    """Synthetic prompt/completion rows (sums from domain.txt), each well under `max_length` tokens, until they hold
    1.3x `tokens_needed`; plus a small validation file for our stage's held-out evaluation. Deterministic."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = [line.strip() for line in (DATA / "domain.txt").read_text().splitlines() if line.strip()]
    per_line = sum(len(tokenizer(line).input_ids) for line in lines[:50]) / 50
    # Rows of 1/16 to 3/4 of the packed length: several documents per packed sequence, none truncated.
    low, high = max(1, int(shape.max_length / 16 / per_line)), max(1, int(shape.max_length * 3 / 4 / per_line))
    rng = random.Random(SEED)

    def row(index: int) -> dict[str, str]:
        count = rng.randint(low, high)
        text = " ".join(lines[(rng.randrange(len(lines)) + k) % len(lines)] for k in range(count))
        return {"prompt": f"Task {index}: continue the sums.\n", "completion": " " + text}

    rows, tokens = [], 0
    while tokens < 1.3 * tokens_needed:
        rows.append(row(len(rows)))
        tokens += len(tokenizer(rows[-1]["prompt"] + rows[-1]["completion"]).input_ids)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "validation.jsonl").write_text("".join(json.dumps(row(10**6 + i)) + "\n" for i in range(8)))
    return {"rows": len(rows), "tokens": tokens}


# ---- timing ---------------------------------------------------------------------------------------------------------
def instrument_sft_trainer(warmup_steps: int) -> None:
    """Time every SFTTrainer.train() (ours and the bare script's) from the end of step `warmup_steps` to the end of
    the last step; the device is synchronised at both marks only, so the steps themselves run as they would."""
    import torch
    import trl
    from transformers import TrainerCallback

    original = trl.SFTTrainer.train

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: dict[str, tuple[int, float, int]] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step not in (warmup_steps, state.max_steps):
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            mark = "start" if state.global_step == warmup_steps else "end"
            self.marks[mark] = (state.global_step, time.perf_counter(), state.num_input_tokens_seen)

    def timed_train(self, *args, **kwargs):
        clock = StepClock()
        self.add_callback(clock)
        result = original(self, *args, **kwargs)
        (first, started, tokens_before), (last, ended, tokens_after) = clock.marks["start"], clock.marks["end"]
        TIMINGS.append({"steps": last - first, "seconds": ended - started, "tokens": tokens_after - tokens_before})
        return result

    trl.SFTTrainer.train = timed_train


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


# ---- the two sides --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    config: str  # full | lora
    attn: str
    model_dir: Path
    data_dir: Path
    out: Path
    steps: int  # total optimizer steps, warm-up included
    batch_size: int
    max_length: int
    gpu: bool
    gradient_checkpointing: bool

    @property
    def optimizer(self) -> str:
        return "adamw_torch_fused" if self.gpu else "adamw_torch"


def bare_trl(run: Run) -> dict:
    """What a user would write by hand: SFTTrainer on the same rows and hyper-parameters, no checkpoints, no eval."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (run.data_dir / "train.jsonl").read_text().splitlines()]
    args = SFTConfig(
        output_dir=str(run.out),
        max_steps=run.steps,
        per_device_train_batch_size=run.batch_size,
        max_length=run.max_length,
        packing=True,
        learning_rate=LEARNING_RATE[run.config],
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        optim=run.optimizer,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=not run.gpu,
        bf16=run.gpu,
        activation_checkpointing=run.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
    )
    # fp32 master weights for full fine-tuning under bf16 autocast; LoRA's frozen base in bf16 (as our stage loads).
    dtype = torch.float32 if run.config == "full" or not run.gpu else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=dtype, attn_implementation=run.attn)
    peft_config = None
    if run.config == "lora":
        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(run.model_dir),
        peft_config=peft_config,
    )
    trainer.train()
    return TIMINGS[-1]


def our_stage(run: Run) -> dict:
    """Our sft stage, rendered from a FineTuneJob spec and run by the stage entrypoint in this process (no Ray)."""
    from finetune_api.render import render_stage
    from finetune_api.spec import FineTuneJobSpec
    from finetune_trainer.stage import run_stage

    peft = {"method": "full"} if run.config == "full" else {"method": "lora", **LORA}
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": str(run.model_dir)},
            "storage": {"uri": str(run.out)},
            "peft": peft,
            "resources": {"workers": 1, "gpusPerWorker": 1 if run.gpu else 0},
            "training": {
                "maxSteps": run.steps,
                "batchSize": run.batch_size,
                "evalBatchSize": 1,
                "maxLength": run.max_length,
                "packing": True,
                "learningRate": LEARNING_RATE[run.config],
                "lrScheduler": "cosine",
                "warmupRatio": 0.03,
                "optimizer": run.optimizer,
                "precision": "bf16" if run.gpu else "fp32",
                "gradientCheckpointing": run.gradient_checkpointing,
                "attnImplementation": run.attn,
                "seed": SEED,
                "loggingSteps": 5,
                "saveSteps": run.steps * 10,
            },
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "dataset": {
                        "uri": str(run.data_dir / "train.jsonl"),
                        "validationUri": str(run.data_dir / "validation.jsonl"),
                    },
                }
            ],
        }
    )
    run_stage(render_stage("bench", spec, "sft"), None, use_ray=False)
    return TIMINGS[-1]


SIDES = {"bare TRL": bare_trl, "our stage": our_stage}


# ---- main -----------------------------------------------------------------------------------------------------------
def attention_kernels(requested: list[str] | None, gpu: bool) -> list[str]:
    if requested:
        return requested
    kernels = ["sdpa"]
    if gpu and importlib.util.find_spec("flash_attn") is not None:
        kernels.append("flash_attention_2")
    return kernels


def measure(run: Run, side: str, flops: float, peak: float | None) -> dict:
    _free_memory()
    try:
        timing = SIDES[side](run)
    except Exception as exc:  # noqa: BLE001 - one failed run (e.g. out of memory) must not lose the others
        shutil.rmtree(run.out, ignore_errors=True)
        _free_memory()
        return {"config": run.config, "attn": run.attn, "side": side, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    rate = timing["tokens"] / timing["seconds"]
    achieved = rate * flops / 1e12
    result = {
        "config": run.config,
        "attn": run.attn,
        "side": side,
        **timing,
        "tokens_per_second_per_gpu": rate,
        "model_tflops_per_second": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": _peak_memory_gib(),
    }
    shutil.rmtree(run.out, ignore_errors=True)
    _free_memory()
    return result


def summarise(results: list[dict], repeats: int) -> list[dict]:
    """Per configuration and kernel: the best run of each side, and ours / bare."""
    summary = []
    for key in dict.fromkeys((r["config"], r["attn"]) for r in results):
        best = {}
        for side in SIDES:
            runs = [r for r in results if (r["config"], r["attn"], r["side"]) == (*key, side) and "error" not in r]
            if runs:
                best[side] = max(runs, key=lambda r: r["tokens_per_second_per_gpu"])
        if len(best) < len(SIDES):
            continue  # a side failed every run: its error is in the runs
        ours, bare = best["our stage"], best["bare TRL"]
        summary.append(
            {
                "config": key[0],
                "attn": key[1],
                "repeats": repeats,
                "ours_tokens_per_second_per_gpu": ours["tokens_per_second_per_gpu"],
                "bare_tokens_per_second_per_gpu": bare["tokens_per_second_per_gpu"],
                "ratio": ours["tokens_per_second_per_gpu"] / bare["tokens_per_second_per_gpu"],
                "ours_mfu": ours["mfu"],
                "bare_mfu": bare["mfu"],
                "mfu_goal": FULL_MFU_GOAL if key[0] == "full" else None,
            }
        )
    return summary


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def offline_one_gpu_env() -> None:
    """Before torch and transformers load: nothing is downloaded (the GPU machine may have no network at all), and one
    GPU is visible (with several, the HF Trainer would wrap both sides in DataParallel)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (30; toy: 3)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed first steps (5; toy: 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="packed sequences per step (8; toy: 2)")
    parser.add_argument("--max-length", type=int, default=None, help="packed sequence length (2048; toy: 128)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None, help="attention (and key/value) heads")
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--attn", nargs="+", choices=("sdpa", "flash_attention_2", "eager"), default=None,
                        help="attention kernels (default: sdpa, and flash_attention_2 when flash-attn is importable)")  # fmt: skip
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (alternating); the best counts")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    parser.add_argument("--toy", action="store_true", help="tiny model on the CPU (automatic without a GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--work-dir", type=Path, default=None, help="for the model, data and outputs (a temp dir)")
    args = parser.parse_args(argv)

    offline_one_gpu_env()
    import torch

    gpu = torch.cuda.is_available() and not args.toy
    toy = not gpu
    base = TOY_SHAPE if toy else GPU_SHAPE
    fields = {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate}
    fields.update(heads=args.heads, kv_heads=args.heads, max_length=args.max_length, batch_size=args.batch_size)
    shape = Shape(**{**asdict(base), **{k: v for k, v in fields.items() if v is not None}})
    steps = args.steps if args.steps is not None else (3 if toy else 30)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if toy else 5)
    if steps < 1 or warmup < 1:
        parser.error("--steps and --warmup-steps must be at least 1")
    device_name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if gpu else None)
    kernels = attention_kernels(args.attn, gpu)
    if toy:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print("no GPU (or --toy): tiny model on the CPU, fp32", file=sys.stderr)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-sft-bench-"))
    started = time.perf_counter()
    shape = write_model(work / "model", shape, gpu)
    counts = count_parameters(work / "model")
    tokens_needed = (steps + warmup) * shape.batch_size * shape.max_length
    dataset = write_dataset(work / "data", work / "model", shape, tokens_needed)
    print(f"model and data built in {time.perf_counter() - started:.1f}s: {counts}, {dataset}", file=sys.stderr)

    instrument_sft_trainer(warmup)
    results = []
    for attn in kernels:
        for config in args.configs:
            flops = flops_per_token(counts[config], shape)
            for repeat in range(args.repeats):
                for side in SIDES:
                    run = Run(config, attn, work / "model", work / "data", work / f"out-{config}-{attn}-{repeat}",
                              steps + warmup, shape.batch_size, shape.max_length, gpu, args.gradient_checkpointing)  # fmt: skip
                    result = measure(run, side, flops, peak)
                    results.append({**result, "repeat": repeat, "flops_per_token": flops})
                    if "error" in result:
                        print(f"{config:4s} {attn:17s} {side:9s} run {repeat + 1}: FAILED {result['error']}",
                              file=sys.stderr)  # fmt: skip
                        continue
                    print(
                        f"{config:4s} {attn:17s} {side:9s} run {repeat + 1}: {result['tokens']:8d} tokens in "
                        f"{result['seconds']:7.2f}s = {result['tokens_per_second_per_gpu']:9.0f} tokens/s, "
                        f"MFU {_pct(result['mfu'])}",
                        file=sys.stderr,
                    )

    summary = summarise(results, args.repeats)
    record = {
        "device": device_name,
        "toy": toy,
        "peak_tflops": peak,
        "shape": asdict(shape),
        "parameters": counts,
        "steps": steps,
        "warmup_steps": warmup,
        "gradient_checkpointing": args.gradient_checkpointing,
        "precision": "bf16" if gpu else "fp32",
        "dataset": dataset,
        "versions": _versions(),
        "wall_seconds": time.perf_counter() - started,
        "summary": summary,
        "runs": results,
    }
    failed = [r for r in results if "error" in r]
    record["failed_runs"] = len(failed)
    print(
        f"\nSFT on {device_name} ({'toy ' if toy else ''}hidden {shape.hidden} x {shape.layers} layers, "
        f"{(counts['full']['trained'] + shape.vocab * shape.hidden) / 1e6:.1f}M parameters), seq {shape.max_length}, "
        f"batch {shape.batch_size}, packing, {record['precision']}, {steps} timed steps after {warmup}; "
        f"peak {peak if peak else 'unknown'} TFLOP/s:"
    )
    for row in summary:
        goal = f" (goal >= {100 * row['mfu_goal']:.0f}%)" if row["mfu_goal"] else ""
        print(
            f"  {row['config']:4s} {row['attn']:17s} ours {row['ours_tokens_per_second_per_gpu']:9.0f} tokens/s/GPU, "
            f"MFU {_pct(row['ours_mfu'])}{goal} | bare TRL {row['bare_tokens_per_second_per_gpu']:9.0f}, "
            f"MFU {_pct(row['bare_mfu'])} | ratio ours / bare {row['ratio']:.3f}"
        )
    for run in failed:
        print(f"  FAILED {run['config']} {run['attn']} {run['side']}: {run['error'][:300]}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return record


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    versions.update(transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__)
    if importlib.util.find_spec("flash_attn") is not None:
        import flash_attn

        versions["flash_attn"] = flash_attn.__version__
    return versions


if __name__ == "__main__":
    sys.exit(1 if main()["failed_runs"] else 0)
