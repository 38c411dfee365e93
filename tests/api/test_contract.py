"""The shared contract: manifest errors point at file:line:field, rendering is one-way and deterministic."""

import textwrap

import pytest

from finetune_api.manifest import ManifestError, parse_manifest
from finetune_api.render import rayjob_name, render_stage, resolve_training, stage_configmap_name
from finetune_api.status import FineTuneJobStatus

pytestmark = pytest.mark.unit

GOOD = textwrap.dedent(
    """\
    apiVersion: finetune.dev/v1alpha1
    kind: FineTuneJob
    metadata: {name: quickstart}
    spec:
      model: {source: ./models/tiny}
      storage: {uri: s3://bucket/runs/q}
      peft: {method: lora, r: 8, alpha: 16}
      training: {learningRate: 0.001, maxSteps: 20}
      stages:
      - {name: domain, type: cpt, dataset: {uri: data/domain.txt, format: text}}
      - name: instruct
        type: sft
        dataset: {uri: data/instruct.jsonl}
        training: {maxSteps: 40}
      - {name: rm, type: reward, dataset: {uri: data/prefs.jsonl}, reward: {minRewardAccuracy: 0.8}}
      - {name: rl, type: ppo, rewardFrom: rm, dataset: {uri: data/prompts.jsonl}}
    """
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "job.yaml")
    return info.value.problems


def test_good_manifest_parses_with_camel_case_fields():
    job = parse_manifest(GOOD, "job.yaml")
    assert [s.name for s in job.spec.stages] == ["domain", "instruct", "rm", "rl"]
    assert job.spec.stages[2].reward.min_reward_accuracy == 0.8
    assert job.spec.to_wire()["stages"][3]["rewardFrom"] == "rm"


def test_unknown_field_names_file_line_and_path():
    text = GOOD.replace("{maxSteps: 40}", "{maxStep: 40}")
    assert problems_of(text) == [
        "job.yaml:14: spec.stages[1].training.maxStep: unknown field; did you mean `maxSteps`?"
    ]


def test_reward_from_must_name_an_earlier_reward_stage():
    text = GOOD.replace("rewardFrom: rm", "rewardFrom: instruct")
    assert problems_of(text) == [
        "job.yaml:16: spec.stages[3].rewardFrom: stage 'instruct' has type sft, expected a reward stage"
    ]
    text = GOOD.replace("rewardFrom: rm", "rewardFrom: later")
    assert "'later' is not an earlier stage (earlier stages: domain, instruct, rm)" in problems_of(text)[0]


def test_duplicate_stage_names_and_bad_scheme_are_reported_together():
    text = GOOD.replace("name: instruct", "name: domain").replace("data/prompts.jsonl", "gs://b/prompts.jsonl")
    found = problems_of(text)
    assert any("job.yaml:16: spec.stages[3].dataset.uri: unsupported scheme: expected hf://" in p for p in found), found
    text = GOOD.replace("name: instruct", "name: domain")
    assert problems_of(text) == ["job.yaml:11: spec.stages[1].name: duplicate stage name 'domain'"]


def test_options_must_match_stage_type_and_enums_name_the_value():
    assert problems_of(GOOD.replace("type: reward", "type: dpo"))[0].startswith(
        "job.yaml:15: spec.stages[2].reward: options only allowed on a stage of type reward, not dpo"
    )
    found = problems_of(GOOD.replace("type: cpt", "type: pretrain"))
    assert found[0].startswith("job.yaml:10: spec.stages[0].type:") and "'pretrain'" in found[0]


def test_yaml_syntax_error_has_a_line():
    assert problems_of("apiVersion: finetune.dev/v1alpha1\nspec: [unclosed\n")[0].startswith(
        "job.yaml:3: not valid YAML"
    )


def test_render_chains_stage_outputs_and_layers_training_overrides():
    job = parse_manifest(GOOD, "job.yaml")
    first = render_stage("q", job.spec, "domain")
    second = render_stage("q", job.spec, "instruct", namespace="ml", attempt=2)
    ppo = render_stage("q", job.spec, "rl")
    assert first.input_model == "./models/tiny"
    assert second.input_model == "s3://bucket/runs/q/domain/model"
    assert second.checkpoint_dir == "s3://bucket/runs/q/instruct/checkpoints"
    assert (second.training.max_steps, second.training.learning_rate, second.training.batch_size) == (40, 0.001, 8)
    assert (second.attempt, second.namespace) == (2, "ml")
    assert ppo.reward_model == "s3://bucket/runs/q/rm/model"
    # The policy chain skips reward stages: PPO continues from the SFT model, not from the reward model.
    assert ppo.input_model == "s3://bucket/runs/q/instruct/model"
    assert render_stage("q", job.spec, "rm").input_model == "s3://bucket/runs/q/instruct/model"


def test_default_learning_rate_depends_on_stage_type_and_peft():
    job = parse_manifest(GOOD.replace("  training: {learningRate: 0.001, maxSteps: 20}\n", ""), "job.yaml")
    assert resolve_training(job.spec, job.spec.stages[1]).learning_rate == 2e-4
    full = job.spec.model_copy(update={"peft": job.spec.peft.model_copy(update={"method": "full"})})
    assert resolve_training(full, full.stages[3]).learning_rate == 3e-6


def test_child_names_are_deterministic_and_fit_kubernetes_limits():
    assert rayjob_name("quickstart", "instruct", 3) == "quickstart-instruct-3-c6166bdf"
    long = rayjob_name("j" * 60, "stage", 1)
    assert len(long) <= 47 and not long.endswith("-")
    assert stage_configmap_name("quickstart", "rm") == "quickstart.rm.stage"


def test_condition_transition_time_moves_only_when_status_changes():
    status = FineTuneJobStatus()
    assert status.set_condition("Running", True, "StageRunning", "stage a")
    first = status.condition("Running").last_transition_time
    status.conditions[0].last_transition_time = "2000-01-01T00:00:00Z"
    assert status.set_condition("Running", True, "StageRunning", "stage b")
    assert status.condition("Running").last_transition_time == "2000-01-01T00:00:00Z"
    assert status.set_condition("Running", False, "AllStagesSucceeded")
    assert status.condition("Running").last_transition_time != "2000-01-01T00:00:00Z"
    assert first is not None
    assert not status.set_condition("Running", False, "AllStagesSucceeded")
