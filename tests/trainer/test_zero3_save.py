"""A ZeRO-3 stage's final save: only rank 0 ever holds the whole model; the other ranks gather one module's weights at
a time. Rank 0 writes the trained weights (those DeepSpeed's engine consolidates), and an error found on rank 0 fails
every rank for the same reason.

Two processes (gloo, on the CPU) run this file as a script: each loads the tiny model partitioned (deepspeed.zero.Init),
trains one step in a DeepSpeed engine and calls StageContext.save_final, as a stage's workers do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stage_helpers import DATA

from finetune_api.spec import ModelSpec, PeftSpec
from finetune_dev.testing import free_port, source_env
from finetune_trainer import modeling

pytestmark = pytest.mark.train

LORA = PeftSpec.model_validate({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
FULL = PeftSpec.model_validate({"method": "full"})
TEXTS = ["<|im_start|>user\nWhat is 3 plus 1?<|im_end|>\n4", "Add 5 and 8.<|im_end|> 13"]
# Every weight partitioned, however small (by default ZeRO-3 keeps weights under 100,000 elements whole on each rank).
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


@pytest.mark.parametrize("loader", [modeling.load_causal_lm, modeling.load_sequence_classifier])
@pytest.mark.parametrize("peft", [FULL, LORA], ids=["full", "lora"])
def test_plain_copy_is_the_model(loader, peft, tiny_model_dir, tmp_path):
    """Rank 0's copy has the model's class, config, adapters and weights: the same outputs and generation settings
    (with the llama3 template's tokens added: grown embeddings, trainable token rows)."""
    spec = ModelSpec.model_validate({"source": str(tiny_model_dir), "chatTemplate": "llama3"})
    tokenizer = modeling.load_tokenizer(str(tiny_model_dir), spec, tmp_path)
    model = loader(
        str(tiny_model_dir), spec, tokenizer, peft=peft, trainable=True, precision={}, gpu=False, cache=tmp_path
    )
    with torch.no_grad():  # trained weights differ from the input model's
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    copy = modeling.plain_copy(model, {key: value.clone() for key, value in model.state_dict().items()})
    assert type(copy) is type(model)
    batch = tokenizer(["<|start_header_id|>user<|end_header_id|> 3 plus 1?<|eot_id|> 4"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(copy(**batch).logits, model.eval()(**batch).logits)
    if loader is modeling.load_causal_lm:
        assert copy.generation_config.eos_token_id == model.generation_config.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["full", "lora"])
def test_zero3_final_save_gathers_the_model_on_rank_0_only(peft, render, tmp_path):
    config = render(
        {
            "type": "sft",
            "dataset": {"uri": str(DATA / "instruct.jsonl")},
            "export": "merged" if peft == "full" else "both",
        },
        peft=peft,
        deepspeed={"zeroStage": 3},
        evaluation={"suites": [{"name": "domain", "uri": str(DATA / "domain.txt"), "maxSamples": 4}]},
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    port = str(free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), port, str(config_file), str(tmp_path)],
            env=source_env(DS_ACCELERATOR="cpu"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    finally:
        for worker in workers:  # a rank that hangs (waiting for one that failed) is not left running
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    rank0, rank1 = (json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1))

    # Rank 1 held at most one module's weights whole at a time, never the whole model.
    assert 0 < rank1["max_gathered"] <= rank1["largest_module"] < rank1["total"]
    # Rank 0 wrote the trained weights, and every rank ends with its metrics (the suites', scored on rank 0 alone).
    assert rank0["mismatched"] == [] and rank0["compared"] > 0
    assert rank1["metrics"] == rank0["metrics"] and "domain_loss_after" in rank0["metrics"]
    # A NaN in rank 1's shard is found on rank 0, and both ranks fail with its error; nothing is written.
    assert rank0["failure"] == rank1["failure"]
    assert rank0["failure"]["reason"] == "TrainingDiverged" and rank0["failure"]["permanent"]
    assert not rank0["diverged_output_exists"]


def _gathered_elements(model) -> int:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE)


def _worker(rank: int, port: str, config_file: Path, out: Path) -> None:
    """One rank: load partitioned, train a step, save (measuring what it gathers), then save again with a NaN in rank
    1's shard of a weight."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from finetune_api.render import StageConfig
    from finetune_trainer.errors import StageError
    from finetune_trainer.metrics import STAGE_METRICS
    from finetune_trainer.recipes.context import StageContext

    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    config = StageConfig.model_validate_json(config_file.read_text())
    ctx = StageContext(config, None, rank=rank, world_size=2, work_dir=out / f"work-{rank}")
    tokenizer = ctx.tokenizer()
    hf_deepspeed = HfDeepSpeedConfig(DS_CONFIG)  # what the Trainer's arguments set up; loading partitions
    model = ctx.causal_lm()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=DS_CONFIG)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    engine.backward(engine(**batch, labels=batch["input_ids"]).loss)
    engine.step()
    reference = engine._zero3_consolidated_16bit_state_dict()
    result: dict = {"total": sum(p.ds_numel for p in model.parameters())}
    result["largest_module"] = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in model.modules())

    # The most weight elements this rank holds gathered, sampled as each gather begins during the save.
    enter = deepspeed.zero.GatheredParameters.__enter__
    peak = [_gathered_elements(model)]

    def measured_enter(self):
        enter(self)
        peak[0] = max(peak[0], _gathered_elements(model))

    deepspeed.zero.GatheredParameters.__enter__ = measured_enter
    metrics = dict.fromkeys(STAGE_METRICS["sft"], 1.0)
    ctx.save_final(engine, tokenizer, metrics)
    deepspeed.zero.GatheredParameters.__enter__ = enter
    result.update(max_gathered=peak[0], metrics=metrics)
    if rank == 0:
        result["mismatched"], result["compared"] = _compare(model, reference, Path(config.output_uri), ctx)

    shard = next(p for p in model.parameters() if p.ds_tensor.numel() > 0).ds_tensor
    if rank == 1:
        shard.data[0] = float("nan")
    ctx.config = config.model_copy(update={"output_uri": str(out / "diverged")})
    try:
        ctx.save_final(engine, tokenizer, dict.fromkeys(STAGE_METRICS["sft"], 1.0))
        result["failure"] = None
    except StageError as error:
        result["failure"] = {"reason": str(error.reason), "permanent": error.permanent, "message": str(error)}
    result["diverged_output_exists"] = (out / "diverged").exists()
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    del hf_deepspeed


def _compare(model, reference: dict, output: Path, ctx) -> tuple[list[str], int]:
    """(names of the written tensors that differ from the reference, how many were compared).

    Full fine-tuning: the written model is the reference itself. LoRA: the written adapter holds the reference's
    adapter weights, and the merged model computes what the input model with that adapter does."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    if not isinstance(model, PeftModel):
        written = load_file(output / "model.safetensors")
        expected = reference
    else:
        written = load_file(output / "adapter" / "adapter_model.safetensors")
        expected = get_peft_model_state_dict(model, state_dict=reference)
    mismatched = sorted(set(written) ^ set(expected))
    mismatched += [key for key in sorted(set(written) & set(expected)) if not torch.equal(written[key], expected[key])]
    if isinstance(model, PeftModel):
        from transformers import AutoModelForCausalLM

        tokenizer = ctx.tokenizer()
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        with ctx._whole_model_loading():  # rank 0 loads alone
            merged = AutoModelForCausalLM.from_pretrained(output)
            adapted = PeftModel.from_pretrained(ctx.causal_lm(trainable=False), output / "adapter")
        with torch.no_grad():
            if not torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-5):
                mismatched.append("merged model")
    return mismatched, len(written)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
