"""Run one stage's recipe on Ray Train workers (TorchTrainer), one worker per `resources.workers`.

Ray Train sets up the torch.distributed process group (gloo on CPU, NCCL on GPU) and the RANK/WORLD_SIZE/... variables
that DeepSpeed and the HF Trainer read. Every worker ends with `ray.train.report()` (a barrier). Rank 0 hands the
stage's final metrics and report to a small actor the driver owns. `Result.metrics` cannot carry them: Ray Train V2
keeps only metrics that come with a checkpoint (`_build_result` in ray/train/v2/_internal/execution/controller/
controller.py), and persisting one needs `storage_path` shared by every node (`_check_validation_file` in
ray/train/v2/_internal/execution/storage.py). On KubeRay each pod's scratch space is its own, so that check fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune_api.render import StageConfig
from finetune_api.report import StageReport
from finetune_trainer import strategy
from finetune_trainer.reporting import Reporter
from finetune_trainer.worker import execute_stage


def _train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    # Ray starts workers in its own session directory; relative data and model paths mean the launcher's directory.
    os.chdir(loop_config["cwd"])
    context = ray.train.get_context()
    config = StageConfig.model_validate_json(loop_config["config"])
    strategy.attach_deepspeed(config.resources, config.deepspeed)
    metrics, report = execute_stage(
        config,
        loop_config["reporter"],
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        work_dir=Path(loop_config["work_dir"]),
    )
    if context.get_world_rank() == 0:
        ray.get(loop_config["results"].put.remote(json.dumps(metrics), json.dumps(report.to_wire())))
    ray.train.report({})


def _results_actor():
    import ray

    @ray.remote(num_cpus=0)
    class StageResults:
        """Holds rank 0's final metrics and report until the driver reads them."""

        def __init__(self):
            self.value: tuple[str, str] | None = None

        def put(self, metrics: str, report: str) -> None:
            self.value = (metrics, report)

        def get(self) -> tuple[str, str] | None:
            return self.value

    return StageResults.remote()


def _check_gpus(resources, num_workers: int, per_worker: dict[str, float]) -> None:
    """Fail with GPUUnavailable before Ray Train starts: it sets up NCCL on its workers before our code runs there, and
    on a node without CUDA that fails with a bare `ProcessGroupNCCL is only supported with GPUs`. One probe per Train
    worker, each holding what a worker will hold, so together they land on the GPUs the workers will get."""
    import ray

    probe = ray.remote(strategy.use_gpu).options(num_cpus=per_worker["CPU"], num_gpus=per_worker["GPU"])
    try:
        ray.get([probe.remote(resources) for _ in range(num_workers)])
    except ray.exceptions.RayTaskError as error:
        # The worker's own StageError (reason, permanence, message), not Ray's wrapper with its traceback.
        raise error.cause from None


def run_on_ray(config: StageConfig, reporter: Reporter | None, work_dir: Path) -> tuple[dict[str, float], StageReport]:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = config.resources
    # Ray Train re-routes print() in workers through its logger, which duplicates our progress lines.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    started_here = not ray.is_initialized()
    if started_here:
        address = os.environ.get("RAY_ADDRESS")
        # A local cluster gets exactly the CPUs the workers ask for, even on a smaller machine (logical CPUs only).
        local = (
            {} if address else {"num_cpus": resources.workers * resources.cpus_per_worker, "include_dashboard": False}
        )
        ray.init(address=address, log_to_driver=True, configure_logging=False, **local)
    try:
        # The spec decides (the head, where this runs, has no GPU); see strategy.use_gpu.
        num_workers, per_worker = strategy.train_workers(resources)
        if "GPU" in per_worker:
            _check_gpus(resources, num_workers, per_worker)
        results = _results_actor()
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "config": config.model_dump_json(),
                "reporter": reporter,
                "work_dir": str(work_dir),
                "cwd": os.getcwd(),
                "results": results,
            },
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu="GPU" in per_worker, resources_per_worker=per_worker
            ),
            torch_config=TorchConfig(backend=strategy.backend(resources)),
            run_config=RunConfig(
                name=f"{config.job_name}-{config.stage.name}-{config.attempt}",
                storage_path=str(work_dir / "ray"),
                # Retries belong to the operator (a fresh attempt resumes from the stage checkpoint), not to Ray.
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        trainer.fit()
        final = ray.get(results.get.remote())
        if final is None:
            raise RuntimeError("Ray Train finished without rank 0's final report")
        return json.loads(final[0]), StageReport.model_validate_json(final[1])
    finally:
        if started_here:
            ray.shutdown()
