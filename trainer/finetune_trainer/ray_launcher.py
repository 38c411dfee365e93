"""Run one stage's recipe on Ray Train workers (TorchTrainer), one worker per `resources.workers`.

Ray Train sets up the torch.distributed process group (gloo on CPU, NCCL on GPU) and the RANK/WORLD_SIZE/... variables
that DeepSpeed and the HF Trainer read. Every worker ends with `ray.train.report()` (a barrier); rank 0's carries the
stage's final metrics and report, which `Result.metrics` hands back. Ray Train V2 keeps only metrics that come with a
checkpoint (`_build_result` in ray/train/v2/_internal/execution/controller/controller.py), so rank 0 attaches a small one.
"""

from __future__ import annotations

import json
import os
import tempfile
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
    if context.get_world_rank() != 0:
        ray.train.report({})
        return
    final = {"metrics": json.dumps(metrics), "report": json.dumps(report.to_wire())}
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "report.json").write_text(final["report"])
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(directory))


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
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "config": config.model_dump_json(),
                "reporter": reporter,
                "work_dir": str(work_dir),
                "cwd": os.getcwd(),
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
        result = trainer.fit()
        return json.loads(result.metrics["metrics"]), StageReport.model_validate_json(result.metrics["report"])
    finally:
        if started_here:
            ray.shutdown()
