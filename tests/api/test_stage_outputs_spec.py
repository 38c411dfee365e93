"""`stages[].export` and `training.evalSteps` / `training.earlyStopping`: parsed, rendered, and refused where they
cannot work, naming the field."""

import textwrap

import pytest

from finetune_api.manifest import ManifestError, parse_manifest
from finetune_api.render import render_stage
from finetune_api.spec import EarlyStoppingSpec, StageSpec

pytestmark = pytest.mark.unit

JOB = textwrap.dedent(
    """\
    apiVersion: finetune.dev/v1alpha1
    kind: FineTuneJob
    metadata: {name: outputs}
    spec:
      model: {source: ./models/tiny}
      storage: {uri: s3://bucket/runs/o}
      training: {evalSteps: 10, earlyStopping: {patience: 2, minDelta: 0.01}}
      stages:
      - {name: instruct, type: sft, export: both, dataset: {uri: data/instruct.jsonl}}
      - {name: prefs, type: dpo, export: adapter, training: {evalSteps: 5}, dataset: {uri: data/prefs.jsonl}}
    """
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "job.yaml")
    return info.value.problems


def test_export_and_early_stopping_render_into_the_stage_config():
    spec = parse_manifest(JOB, "job.yaml").spec
    first, second = (render_stage("o", spec, name) for name in ("instruct", "prefs"))
    assert (first.stage.export, second.stage.export) == ("both", "adapter")
    assert first.training.eval_steps == 10 and second.training.eval_steps == 5
    assert second.training.early_stopping == EarlyStoppingSpec(patience=2, min_delta=0.01)
    assert spec.to_wire()["training"]["earlyStopping"] == {"patience": 2, "minDelta": 0.01}


def test_defaults_keep_a_merged_output_and_evaluation_before_and_after_only():
    stage = StageSpec.model_validate({"name": "s", "type": "sft", "dataset": {"uri": "d.jsonl"}})
    assert stage.export == "merged"
    text = JOB.replace("  training: {evalSteps: 10, earlyStopping: {patience: 2, minDelta: 0.01}}\n", "")
    config = render_stage("o", parse_manifest(text, "job.yaml").spec, "instruct")
    assert config.training.eval_steps is None and config.training.early_stopping is None
    assert EarlyStoppingSpec() == EarlyStoppingSpec(patience=3, min_delta=0.0)


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("export: both", "export: lora", "job.yaml:9: spec.stages[0].export:"),
        ("evalSteps: 10", "evalSteps: 0", "job.yaml:7: spec.training.evalSteps:"),
        ("patience: 2", "patience: 0", "job.yaml:7: spec.training.earlyStopping.patience:"),
        ("minDelta: 0.01", "minDelta: -1", "job.yaml:7: spec.training.earlyStopping.minDelta:"),
        ("minDelta: 0.01", "minDelta: '0.01'", "job.yaml:7: spec.training.earlyStopping.minDelta:"),
        ("patience: 2", "patience: 2, mode: min", "job.yaml:7: spec.training.earlyStopping.mode:"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(old, new, where):
    assert old in JOB
    found = problems_of(JOB.replace(old, new))
    assert len(found) == 1 and found[0].startswith(where), found


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("storage:", "peft: {method: full}\n  storage:", "spec.stages[0].export: both needs peft.method lora or qlora"),
        (
            "export: both,",
            "export: both, peft: {method: full},",
            "spec.stages[0].export: both needs peft.method lora or qlora",
        ),
        ("export: both", "export: adapter", "spec.stages[0].export: adapter writes no merged model, but stage 'prefs'"),
        (
            "  training: {evalSteps: 10, earlyStopping: {patience: 2, minDelta: 0.01}}\n",
            "  training: {earlyStopping: {}}\n",
            "spec.training.earlyStopping: requires training.evalSteps, the held-out evaluations it watches "
            "(stage 'instruct' sets none)",
        ),
        (
            "  training: {evalSteps: 10, earlyStopping: {patience: 2, minDelta: 0.01}}\n",
            "",
            None,
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(old, new, where):
    text = JOB.replace(old, new)
    if where is None:  # without early stopping, the adapter-only last stage is fine
        assert parse_manifest(text, "job.yaml").spec.stages[1].export == "adapter"
        return
    found = problems_of(text)
    assert len(found) == 1 and where in found[0], found


def test_early_stopping_set_on_a_stage_needs_eval_steps_from_either_layer():
    stage_only = JOB.replace("evalSteps: 10, earlyStopping: {patience: 2, minDelta: 0.01}", "evalSteps: 10").replace(
        "training: {evalSteps: 5}", "training: {earlyStopping: {patience: 1}}"
    )
    assert render_stage("o", parse_manifest(stage_only, "job.yaml").spec, "prefs").training.eval_steps == 10
    neither = stage_only.replace("training: {evalSteps: 10}", "training: {}")
    found = problems_of(neither)
    assert len(found) == 1 and "spec.stages[1].training.earlyStopping: requires training.evalSteps" in found[0]


def test_a_reward_model_that_a_later_stage_scores_with_must_be_merged():
    text = textwrap.dedent(
        """\
        apiVersion: finetune.dev/v1alpha1
        kind: FineTuneJob
        metadata: {name: rm}
        spec:
          model: {source: ./models/tiny}
          storage: {uri: ./out}
          stages:
          - {name: rm, type: reward, export: adapter, dataset: {uri: prefs.jsonl}}
          - {name: sft, type: sft, dataset: {uri: instruct.jsonl}}
        """
    )
    # A policy stage after a reward stage starts from the base model, not from the scorer.
    assert parse_manifest(text, "job.yaml").spec.stages[0].export == "adapter"
    with_ppo = text + "  - {name: ppo, type: ppo, rewardFrom: rm, dataset: {uri: prompts.jsonl}}\n"
    found = problems_of(with_ppo)
    assert len(found) == 1 and "spec.stages[0].export: adapter writes no merged model, but stage 'ppo'" in found[0]


@pytest.mark.parametrize("field", ["evalSteps: 10", "earlyStopping: {patience: 2}"])
def test_rl_stages_refuse_held_out_options_of_their_own_and_ignore_inherited_ones(field):
    text = textwrap.dedent(
        """\
        apiVersion: finetune.dev/v1alpha1
        kind: FineTuneJob
        metadata: {name: rl}
        spec:
          model: {source: ./models/tiny}
          storage: {uri: ./out}
          training: {evalSteps: 10, earlyStopping: {}}
          stages:
          - {name: rm, type: reward, dataset: {uri: prefs.jsonl}}
          - {name: ppo, type: ppo, rewardFrom: rm, dataset: {uri: prompts.jsonl}}
        """
    )
    assert parse_manifest(text, "job.yaml").spec.stages[1].training is None
    own = text.replace("rewardFrom: rm,", f"rewardFrom: rm, training: {{{field}}},")
    found = problems_of(own)
    wire = field.split(":")[0]
    assert len(found) == 1 and f"spec.stages[1].training.{wire}: applies to the held-out loss" in found[0], found
