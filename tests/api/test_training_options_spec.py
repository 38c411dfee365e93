"""Training options a TRL user expects: attention kernel, optimizer, NEFTune, DoRA/rsLoRA, modules to save."""

import textwrap

import pytest

from finetune_api.manifest import ManifestError, parse_manifest
from finetune_api.render import render_stage, resolve_training
from finetune_api.spec import PeftSpec, TrainingSpec

pytestmark = pytest.mark.unit

JOB = textwrap.dedent(
    """\
    apiVersion: finetune.dev/v1alpha1
    kind: FineTuneJob
    metadata: {name: opts}
    spec:
      model: {source: ./models/tiny}
      storage: {uri: s3://bucket/runs/o}
      peft: {method: lora, useDora: true, useRslora: true, modulesToSave: [lm_head, model.embed_tokens]}
      training: {attnImplementation: sdpa, optimizer: adafactor, neftuneNoiseAlpha: 5}
      stages:
      - {name: instruct, type: sft, dataset: {uri: data/instruct.jsonl}}
      - name: again
        type: sft
        dataset: {uri: data/instruct.jsonl}
        training: {optimizer: sgd, neftuneNoiseAlpha: 10.5}
    """
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "job.yaml")
    return info.value.problems


def test_options_parse_camel_case_and_stage_training_overrides_them_field_by_field():
    job = parse_manifest(JOB, "job.yaml")
    peft = job.spec.peft
    assert (peft.use_dora, peft.use_rslora, peft.modules_to_save) == (True, True, ["lm_head", "model.embed_tokens"])
    first, second = (resolve_training(job.spec, stage) for stage in job.spec.stages)
    assert (first.attn_implementation, first.optimizer, first.neftune_noise_alpha) == ("sdpa", "adafactor", 5.0)
    assert (second.attn_implementation, second.optimizer, second.neftune_noise_alpha) == ("sdpa", "sgd", 10.5)
    config = render_stage("o", job.spec, "again")
    assert config.training.optimizer == "sgd" and config.peft.use_dora
    assert job.spec.to_wire()["training"]["neftuneNoiseAlpha"] == 5


def test_defaults_leave_the_optimizer_noise_and_attention_to_the_libraries():
    text = JOB.replace("  training: {attnImplementation: sdpa, optimizer: adafactor, neftuneNoiseAlpha: 5}\n", "")
    resolved = resolve_training(parse_manifest(text, "job.yaml").spec, parse_manifest(text, "job.yaml").spec.stages[0])
    assert resolved.optimizer is None
    assert resolved.neftune_noise_alpha is None and resolved.attn_implementation is None
    assert (PeftSpec().use_dora, PeftSpec().use_rslora, PeftSpec().modules_to_save) == (False, False, None)


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("optimizer: adafactor", "optimizer: adamw_8bit", "job.yaml:8: spec.training.optimizer:"),
        ("attnImplementation: sdpa", "attnImplementation: flash", "job.yaml:8: spec.training.attnImplementation:"),
        ("neftuneNoiseAlpha: 5}", "neftuneNoiseAlpha: 0}", "job.yaml:8: spec.training.neftuneNoiseAlpha:"),
        ("neftuneNoiseAlpha: 5}", "neftuneNoiseAlpha: 51}", "job.yaml:8: spec.training.neftuneNoiseAlpha:"),
        (
            "neftuneNoiseAlpha: 10.5",
            "neftuneNoiseAlpha: '10'",
            "job.yaml:14: spec.stages[1].training.neftuneNoiseAlpha:",
        ),
        ("useDora: true", "useDora: 'yes'", "job.yaml:7: spec.peft.useDora:"),
        ("lm_head, model", "lm-head, model", "job.yaml:7: spec.peft.modulesToSave[0]:"),
        ("[lm_head, model.embed_tokens]", "[lm_head.]", "job.yaml:7: spec.peft.modulesToSave[0]:"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(old, new, where):
    assert old in JOB
    found = problems_of(JOB.replace(old, new))
    assert len(found) == 1 and found[0].startswith(where), found


def test_modules_to_save_is_bounded():
    names = ", ".join(f"m{i}" for i in range(65))
    found = problems_of(JOB.replace("[lm_head, model.embed_tokens]", f"[{names}]"))
    assert found[0].startswith("job.yaml:7: spec.peft.modulesToSave:"), found


@pytest.mark.parametrize("option", ["useDora: true", "useRslora: true", "modulesToSave: [lm_head]"])
def test_adapter_options_are_refused_for_full_fine_tuning(option):
    text = JOB.replace(
        "peft: {method: lora, useDora: true, useRslora: true, modulesToSave: [lm_head, model.embed_tokens]}",
        f"peft: {{method: full, {option}}}",
    )
    wire = option.split(":")[0]
    found = problems_of(text)
    assert len(found) == 1 and f"spec.peft.{wire}: applies to lora and qlora, not method full" in found[0], found


def test_unused_adapter_options_are_allowed_with_full_fine_tuning():
    peft = PeftSpec.model_validate({"method": "full", "useDora": False, "useRslora": False, "modulesToSave": []})
    assert peft.method == "full"


def test_the_spec_models_carry_the_bounds_directly():
    with pytest.raises(ValueError, match="neftune_noise_alpha|neftuneNoiseAlpha"):
        TrainingSpec(neftune_noise_alpha=-1.0)
    assert PeftSpec(method="qlora", use_dora=True).use_dora
