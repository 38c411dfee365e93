"""The metric schema in docs/trainer.md is the one the trainer enforces before every final save."""

import re
from pathlib import Path

import pytest

from finetune_api.spec import StageType
from finetune_trainer.metrics import STAGE_METRICS

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs" / "trainer.md"


def documented_schema() -> dict[str, tuple[str, ...]]:
    section = DOCS.read_text().split("### Metric schema", 1)[1].split("\n#", 1)[0]
    schema = {}
    for types, metrics in re.findall(r"^\| (`[^|]+`) \| (`[^|]+`) \|$", section, flags=re.MULTILINE):
        for stage_type in re.findall(r"`(\w+)`", types):
            schema[stage_type] = tuple(re.findall(r"`(\w+)`", metrics))
    return schema


def test_every_stage_type_has_the_documented_metrics():
    assert set(STAGE_METRICS) == {t.value for t in StageType}
    assert documented_schema() == STAGE_METRICS


def test_a_recipe_that_leaves_out_a_schema_metric_cannot_save(render):
    from finetune_trainer.recipes.guards import check_metrics

    config = render({"type": "dpo", "dataset": {"uri": "prefs.jsonl"}})
    with pytest.raises(RuntimeError, match="reported no eval_reward_margin"):
        check_metrics(config, {"eval_loss_before": 0.69, "eval_loss_after": 0.5, "eval_reward_accuracy": 0.9})
