"""DeepSpeed config generation and precision choice (golden values)."""

import pytest

from finetune_api.spec import DeepSpeedSpec
from finetune_trainer import strategy

pytestmark = pytest.mark.unit

AUTO_FIELDS = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
}


def test_zero_stage_0_means_no_deepspeed():
    assert strategy.deepspeed_config(DeepSpeedSpec()) is None


def test_zero_2_golden():
    assert strategy.deepspeed_config(DeepSpeedSpec(zero_stage=2)) == {
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        **AUTO_FIELDS,
    }


def test_zero_2_with_optimizer_offload_golden():
    config = strategy.deepspeed_config(DeepSpeedSpec(zero_stage=2, offload_optimizer=True))
    assert config["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }


def test_zero_3_full_offload_golden():
    assert strategy.deepspeed_config(DeepSpeedSpec(zero_stage=3, offload_optimizer=True, offload_params=True)) == {
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        **AUTO_FIELDS,
    }


def test_precision_is_fp32_on_cpu_and_bf16_on_gpu(monkeypatch):
    assert strategy.precision_flags("auto", gpu=False) == {"bf16": False, "fp16": False}
    assert strategy.precision_flags("bf16", gpu=False) == {"bf16": False, "fp16": False}
    assert strategy.precision_flags("fp16", gpu=True) == {"bf16": False, "fp16": True}
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert strategy.precision_flags("auto", gpu=True) == {"bf16": True, "fp16": False}


def test_single_process_env_fills_what_deepspeed_needs(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "placeholder")  # so that monkeypatch restores the original (absent) state afterwards
        monkeypatch.delenv(name)
    strategy.single_process_env()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", "0")


def test_training_args_carry_the_deepspeed_config_and_cpu_precision(render, tmp_path):
    from transformers import TrainingArguments

    from finetune_trainer.recipes.context import StageContext

    config = render(
        {"type": "cpt", "dataset": {"uri": "examples/data/domain.txt"}},
        deepspeed={"zeroStage": 2},
        training={"maxSteps": 7, "saveSteps": 3, "precision": "auto"},
    )
    args = StageContext(config, None, rank=0, world_size=1, work_dir=tmp_path).training_args(TrainingArguments)
    assert args.max_steps == 7 and args.save_steps == 3 and args.eval_on_start
    assert not args.bf16 and not args.fp16 and args.use_cpu
    assert args.deepspeed == strategy.deepspeed_config(DeepSpeedSpec(zero_stage=2))
    assert args.output_dir == str(tmp_path / "checkpoints")


def test_the_spec_decides_gpus_and_a_worker_without_cuda_fails_permanently():
    from finetune_api.reasons import PERMANENT, Reason
    from finetune_api.spec import ResourcesSpec
    from finetune_trainer.errors import StageError

    cpu = ResourcesSpec(workers=2)
    assert (strategy.use_gpu(cpu), strategy.backend(cpu)) == (False, "gloo")
    gpu = ResourcesSpec(workers=2, gpus_per_worker=1)
    # The Ray driver (on the head, which has no GPU) still launches NCCL workers with one GPU each.
    assert strategy.backend(gpu) == "nccl"
    assert strategy.train_workers(gpu) == (2, {"CPU": 1.0, "GPU": 1.0})
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-GPU failure cannot be shown here")
    with pytest.raises(StageError) as failure:
        strategy.use_gpu(gpu)
    assert failure.value.reason == Reason.GPU_UNAVAILABLE and failure.value.permanent
    assert Reason.GPU_UNAVAILABLE in PERMANENT and "gpusPerWorker is 1" in str(failure.value)


def test_a_multi_gpu_pod_runs_one_training_process_per_gpu():
    from finetune_api.spec import ResourcesSpec

    assert strategy.train_workers(ResourcesSpec(workers=2, gpus_per_worker=8, cpus_per_worker=16)) == (
        16,
        {"CPU": 2.0, "GPU": 1.0},
    )
    assert strategy.train_workers(ResourcesSpec(workers=3, cpus_per_worker=4)) == (3, {"CPU": 4.0})


@pytest.mark.parametrize(
    ("precision", "trainable", "peft", "deepspeed", "expected"),
    [
        # Full training without DeepSpeed keeps fp32 master weights under AMP (fp16's GradScaler needs them).
        ({"fp16": True}, True, "full", False, "float32"),
        ({"bf16": True}, True, "full", False, "float32"),
        # DeepSpeed keeps its own fp32 master copy; frozen models and LoRA's frozen base compute in half precision.
        ({"bf16": True}, True, "full", True, "bfloat16"),
        ({"fp16": True}, False, "full", False, "float16"),
        ({"bf16": True}, True, "lora", False, "bfloat16"),
        ({}, True, "full", False, "float32"),
    ],
)
def test_weights_load_in_fp32_where_the_optimizer_updates_them_itself(precision, trainable, peft, deepspeed, expected):
    import torch

    from finetune_trainer.modeling import load_dtype

    dtype = load_dtype(precision, trainable=trainable, peft_method=peft, deepspeed=deepspeed)
    assert dtype == getattr(torch, expected)
