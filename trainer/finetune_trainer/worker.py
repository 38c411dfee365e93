"""The per-rank entry: run one stage's recipe in this process (the whole stage, or one Ray Train worker's share).

This is the leaf that both launchers call: `stage.py` directly in one process, `ray_launcher.py` on each Ray worker.
"""

from __future__ import annotations

from pathlib import Path

from finetune_api.render import StageConfig
from finetune_api.report import StageReport
from finetune_trainer.recipes import RECIPES
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.reporting import Reporter


def _quiet_libraries() -> None:
    """Our progress lines replace the libraries' per-step bars, which flood pod logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def execute_stage(
    config: StageConfig, reporter: Reporter | None, rank: int, world_size: int, local_rank: int, work_dir: Path
) -> tuple[dict[str, float], StageReport]:
    """Run the stage's recipe on this rank; returns its final metrics and the report channel's last report."""
    _quiet_libraries()
    context = StageContext(config, reporter, rank=rank, world_size=world_size, work_dir=work_dir, local_rank=local_rank)
    try:
        metrics = RECIPES[config.stage.type].run(context)
    except BaseException:
        context.close_trackers(failed=True)
        raise
    context.close_trackers(failed=False)
    return {key: float(value) for key, value in metrics.items()}, context.channel.report
