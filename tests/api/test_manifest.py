"""Manifests are read as strictly as kubectl and the API server read them, and every error names its leaf field and line."""

import textwrap
from pathlib import Path

import pytest

from finetune_api import uris
from finetune_api.manifest import ManifestError, load_manifest, load_manifests, parse_manifest
from finetune_api.spec import DATASET_SCHEMES, MODEL_SCHEMES, STORAGE_SCHEMES

pytestmark = pytest.mark.unit

JOB = textwrap.dedent(
    """\
    apiVersion: finetune.dev/v1alpha1
    kind: FineTuneJob
    metadata:
      name: strict
    spec:
      model:
        source: ./models/tiny
      storage:
        uri: ./out/strict
      training:
        batchSize: 8
      stages:
        - name: sft
          type: sft
          dataset:
            uri: examples/data/instruct.jsonl
    """
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "job.yaml")
    return info.value.problems


def test_values_are_not_coerced():
    assert problems_of(JOB.replace("batchSize: 8", 'batchSize: "8"')) == [
        "job.yaml:11: spec.training.batchSize: Input should be a valid integer (got '8')"
    ]
    assert (
        "spec.training.batchSize: Input should be a valid integer (got 8.5)"
        in problems_of(JOB.replace("batchSize: 8", "batchSize: 8.5"))[0]
    )
    # An integer where a number is expected is a number, as in JSON.
    assert parse_manifest(JOB.replace("batchSize: 8", "learningRate: 1"), "job.yaml").spec.training.learning_rate == 1


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_numbers_must_be_finite(value: str):
    (problem,) = problems_of(JOB.replace("batchSize: 8", f"learningRate: {value}"))
    assert problem.startswith("job.yaml:11: spec.training.learningRate: Input should be a finite number")


def test_only_camel_case_wire_names_with_a_suggestion():
    text = JOB.replace(
        "uri: examples/data/instruct.jsonl", "uri: examples/data/instruct.jsonl\n        validation_split: 0.2"
    )
    assert problems_of(text) == [
        "job.yaml:17: spec.stages[0].dataset.validation_split: unknown field; did you mean `validationSplit`?"
    ]
    assert problems_of(JOB.replace("batchSize", "learningrate")) == [
        "job.yaml:11: spec.training.learningrate: unknown field; did you mean `learningRate`?"
    ]
    assert problems_of(JOB.replace("batchSize", "batchSise"))[0].endswith("did you mean `batchSize`?")


def test_a_duplicate_key_is_an_error_naming_both_lines():
    text = JOB.replace("batchSize: 8", "batchSize: 8\n    batchSize: 16")
    assert problems_of(text) == [
        "job.yaml:12: spec.training.batchSize: duplicate key (first at line 11, again at line 12)"
    ]


def test_explicit_null_means_absent():
    text = JOB.replace("  training:\n    batchSize: 8\n", "  training: null\n  peft: null\n  envFromSecrets: ~\n")
    text = text.replace("uri: examples/data/instruct.jsonl", "uri: examples/data/instruct.jsonl\n        columns: null")
    job = parse_manifest(text, "job.yaml")
    assert job.spec.peft.method == "lora" and job.spec.env_from_secrets == []
    assert job.spec.stages[0].dataset.columns == {}
    assert problems_of(JOB.replace("source: ./models/tiny", "source: null")) == [
        "job.yaml:7: spec.model.source: required field is missing"
    ]


def test_document_markers_and_several_jobs(tmp_path: Path):
    assert parse_manifest("---\n" + JOB + "---\n", "job.yaml").metadata.name == "strict"
    two = tmp_path / "two.yaml"
    two.write_text(JOB + "---\n" + JOB.replace("name: strict", "name: second"))
    with pytest.raises(ManifestError) as info:
        load_manifest(two)
    assert "holds 2 FineTuneJobs (strict, second); expected one per file, or use --all" in str(info.value)
    assert [job.metadata.name for job in load_manifests(two)] == ["strict", "second"]
    assert problems_of("---\n") == ["job.yaml:1: no FineTuneJob in the file"]


def test_timestamps_stay_strings():
    job = parse_manifest(JOB.replace("source: ./models/tiny", "source: ./models/tiny\n    revision: 2026-01-01"), "j")
    assert job.spec.model.revision == "2026-01-01"


def test_errors_are_sorted_by_line_across_documents():
    text = JOB.replace("batchSize: 8", "batchSize: x").replace("type: sft", "type: nope")
    text = text + "---\n" + JOB.replace("./out/strict", "s4://x")
    lines = [int(problem.split(":")[1]) for problem in problems_of(text)]
    assert lines == sorted(lines) and len(lines) == 3


def test_a_misplaced_field_points_to_where_it_belongs():
    text = JOB.replace("      type: sft\n", "      type: sft\n      learningRate: 0.1\n")
    assert problems_of(text) == [
        "job.yaml:15: spec.stages[0].learningRate: unknown field; `learningRate` is a field of `spec.stages[0].training`"
    ]


GOOD_URIS = [
    "./models/tiny",
    "/abs/path",
    "../relative/is/fine/locally",
    "org/name",
    "file:///data/x",
    "s3://bucket/a/b",
    "s3://my.bucket-1",
    "pvc://claim",
    "pvc://claim-1/a/b.jsonl",
    "hf://org/name",
]
BAD_URIS = {
    "   ": "blank",
    " ./x": "whitespace",
    "s4://x/y": "unsupported scheme",
    "http://example.com/x": "unsupported scheme",
    "S3://bucket/x": "unsupported scheme",
    "s3:/bucket/x": "unsupported scheme",
    "pvc:///etc": "pvc://CLAIM/PATH",
    "pvc://Claim/x": "pvc://CLAIM/PATH",
    "pvc://ckpts/../../etc": "`..`",
    "pvc://ckpts/a/..": "`..`",
    "s3://bucket/../x": "`..`",
    "pvc://ckpts//etc": "empty path segments",
    "s3://ab": "s3://BUCKET/KEY",
    "hf://a/b/c": "hf://NAME",
    "file://": "file://PATH",
}


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_good_uris(uri: str):
    for schemes in (MODEL_SCHEMES, DATASET_SCHEMES):
        assert uris.check_uri(uri, schemes) == uri


@pytest.mark.parametrize("uri", BAD_URIS)
def test_bad_uris_name_the_broken_rule(uri: str):
    with pytest.raises(ValueError, match=BAD_URIS[uri].replace(".", r"\.").replace("/", "/")):
        uris.check_uri(uri, DATASET_SCHEMES)


def test_storage_takes_no_hub_ids():
    with pytest.raises(ValueError, match="expected s3://, pvc://, file:// or a local path"):
        uris.check_uri("hf://org/name", STORAGE_SCHEMES)
