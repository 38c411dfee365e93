"""Distributed-training details in one place: device, precision, DeepSpeed config, process-group environment.

Recipes never look at ranks, backends or DeepSpeed directly; they get TrainingArguments built from these helpers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from finetune_api.reasons import Reason
from finetune_api.spec import DeepSpeedSpec, ResourcesSpec
from finetune_trainer.errors import ConfigError, StageError

T = TypeVar("T")


def use_gpu(resources: ResourcesSpec) -> bool:
    """Whether this training process runs on a GPU: the spec decides (`gpusPerWorker`), never the node that asks.

    The Ray driver runs on the head, which has no GPU by design, so probing CUDA there would turn a GPU job into a CPU
    one. A training process that should have a GPU and sees none fails at once, permanently: retrying lands on the
    same kind of node."""
    if resources.gpus_per_worker == 0:
        return False
    import torch

    if not torch.cuda.is_available():
        raise StageError(
            f"resources.gpusPerWorker is {resources.gpus_per_worker} but this worker sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): "
            "check the node's NVIDIA driver and device plugin, and that the image is a CUDA build",
            reason=Reason.GPU_UNAVAILABLE,
            permanent=True,
        )
    return True


# training.optimizer values that are bitsandbytes' (GPU kernels), with the class our PPO loop builds for each.
BITSANDBYTES_OPTIMIZERS = {"adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


# bitsandbytes is in the trainer image (the `gpu` extra of uv.lock), not in a development environment.
IN_THE_IMAGE = " (the trainer image has it: the `gpu` extra of uv.lock)"


def require_gpu_package(option: str, package: str, module: str, gpu: bool, otherwise: str, where: str = "") -> None:
    """Refuse, before anything loads, an `option` that needs a GPU and `package` (imported as `module`)."""
    import importlib.util

    if not gpu:
        raise ConfigError(f"{option} needs a GPU; {otherwise}")
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{option} needs the {package} package, which this environment lacks{where}; {otherwise}")


def check_optimizer(optimizer: str | None, gpu: bool) -> None:
    """Refuse a bitsandbytes optimizer before training where it cannot run."""
    if optimizer in BITSANDBYTES_OPTIMIZERS:
        require_gpu_package(
            f"spec.training.optimizer: {optimizer}",
            "bitsandbytes",
            "bitsandbytes",
            gpu,
            "use adamw_torch",
            IN_THE_IMAGE,
        )


def backend(resources: ResourcesSpec) -> str:
    """torch.distributed backend: NCCL between GPUs, gloo on CPU (from the spec, like `use_gpu`)."""
    return "nccl" if resources.gpus_per_worker > 0 else "gloo"


def train_workers(resources: ResourcesSpec) -> tuple[int, dict[str, float]]:
    """(Ray Train workers, resources of each): one process per GPU.

    `workers` pods with `gpusPerWorker: G` run G one-GPU processes each, so ranks on one node talk over NVLink or
    shared memory instead of one process driving G GPUs (and leaving G-1 idle). Ray's default PACK placement puts a
    pod's G bundles on that pod. CPUs are shared out evenly."""
    gpus = resources.gpus_per_worker
    if gpus == 0:
        return resources.workers, {"CPU": float(resources.cpus_per_worker)}
    return resources.workers * gpus, {"CPU": resources.cpus_per_worker / gpus, "GPU": 1.0}


def precision_flags(precision: str, gpu: bool) -> dict[str, bool]:
    """TrainingArguments bf16/fp16 flags. `auto` is bf16 on a GPU that supports it and fp32 on CPU."""
    if precision == "auto":
        import torch

        precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else ("fp16" if gpu else "fp32")
    if precision in ("bf16", "fp16") and not gpu:
        # Mixed precision on CPU is slow and poorly supported by DeepSpeed; fp32 is the honest choice.
        precision = "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def deepspeed_config(spec: DeepSpeedSpec) -> dict[str, Any] | None:
    """An HF-style DeepSpeed config for `spec`, or None when ZeRO is off.

    Batch, precision and clipping fields are "auto" so that TrainingArguments is the single source of truth.
    """
    if spec.zero_stage == 0:
        return None
    zero: dict[str, Any] = {"stage": spec.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if spec.zero_stage == 3:
        # Saving a usable (unsharded) model at the end needs the 16-bit weights gathered on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def attach_deepspeed(resources: ResourcesSpec, spec: DeepSpeedSpec) -> None:
    """Point DeepSpeed's comm layer at the process group Ray Train already set up; call in each Ray Train worker.

    Ray Train initialises torch.distributed but not DeepSpeed's `deepspeed.comm`, so `deepspeed.zero.Init` (ZeRO-3
    loads weights partitioned) would otherwise assume a world of one ("train_batch_size ... 32 != 16 * 1 * 1"). With
    torch.distributed initialised, `init_distributed` wraps the existing group; MPI discovery must stay off."""
    if spec.zero_stage == 0:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend(resources), auto_mpi_discovery=False)


def single_process_env() -> None:
    """Distributed environment for a one-process DeepSpeed run, so DeepSpeed does not fall back to MPI discovery.

    Only for DeepSpeed: with these variables set, accelerate would also wrap plain runs in a one-process DDP.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # The lone rank hosts the rendezvous store itself: port 0 lets the OS pick a free port at bind time, with no window
    # for another process to take a port chosen in advance.
    os.environ.setdefault("MASTER_PORT", "0")


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def on_rank_0(work: Callable[[], T]) -> T:
    """`work()` run on rank 0 alone, its result handed to every rank (call on every rank; the others wait for it).

    An error raised in `work` is raised on every rank: rank 0 raises its own, the others the same StageError (reason,
    permanence and message), so that the stage fails for the same reason whichever rank's failure Ray reports first,
    and any other error as a RuntimeError naming it. No rank is left waiting for one that has failed.
    """
    import torch.distributed as dist

    if not _distributed():
        return work()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result = work()
        except BaseException as error:
            shared = error if isinstance(error, StageError) else RuntimeError(f"rank 0 failed: {error!r}")
            dist.broadcast_object_list([(None, shared)], src=0)
            raise
        outcome = [(result, None)]
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def gather_to_rank_0(model) -> dict[str, Any] | None:
    """The state dict of a model whose weights ZeRO-3 partitions, whole and on the CPU, on rank 0 (None elsewhere).

    Call on every rank. The weights are gathered one module's own parameters at a time, and rank 0 copies them to the
    CPU before the next module's are gathered: no rank ever holds more than one module's weights whole on its device,
    and only rank 0 keeps them (as DeepSpeed's own `_zero3_consolidated_16bit_state_dict`, which needs the engine).
    A parameter that several modules share (tied embeddings) stays one tensor, under each of its names.
    """
    import deepspeed

    state: dict[str, Any] | None = {} if world()[0] == 0 else None
    copies: dict[int, Any] = {}  # each parameter's CPU copy, by the parameter's identity
    # Every name a module is reachable by, as in model.state_dict(), so that the keys are the same.
    for prefix, module in model.named_modules(remove_duplicate=False):
        parameters = list(module.named_parameters(recurse=False, remove_duplicate=False))
        # Read-only (no modifier rank): nothing is broadcast back, the gathered weights are freed again on exit.
        with deepspeed.zero.GatheredParameters([parameter for _, parameter in parameters], modifier_rank=None):
            if state is None:
                continue
            for name, parameter in parameters:
                if id(parameter) not in copies:
                    copies[id(parameter)] = parameter.detach().to("cpu", copy=True)
                state[f"{prefix}.{name}" if prefix else name] = copies[id(parameter)]
        if state is not None:
            # Buffers are not partitioned; the non-persistent ones are not part of a state dict.
            for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
                if name not in module._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = buffer.detach().to("cpu", copy=True)
    return state


def is_zero3(spec: DeepSpeedSpec) -> bool:
    return spec.zero_stage == 3
