"""The generated CRD against a real API server: installs, explains, stores what was written, and enforces every rule
it claims."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from finetune_api.manifest import ManifestError, load_manifest
from finetune_dev import ControlPlane
from finetune_dev.binaries import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))
VALID = sorted(EXAMPLES.glob("*.yaml"))
QUICKSTART = EXAMPLES / "quickstart-k8s.yaml"


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def get_job(cp: ControlPlane, namespace: str, name: str = "quickstart") -> dict:
    return json.loads(cp.kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout)


def apply_quickstart(cp: ControlPlane, namespace: str) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", str(QUICKSTART))


def patch(cp: ControlPlane, namespace: str, body: dict, *extra: str, check: bool = False):
    return cp.kubectl(
        "patch", "ftj", "quickstart", "-n", namespace, "--type=merge", "-p", json.dumps(body), *extra, check=check
    )


def test_crd_is_established_with_its_names(control_plane: ControlPlane):
    crd = json.loads(control_plane.kubectl("get", "crd", "finetunejobs.finetune.dev", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    resources = control_plane.kubectl("api-resources", "--api-group=finetune.dev", "-o", "wide").stdout
    assert re.search(r"finetunejobs\s+ftj\s+finetune.dev/v1alpha1\s+true\s+FineTuneJob", resources), resources
    assert "finetune" in resources.split("\n")[1]  # the category column


def explain(cp: ControlPlane, field: str, timeout: float = 60.0) -> str:
    """The API server publishes a new CRD's OpenAPI a little after it is Established, so retry briefly."""
    deadline = time.monotonic() + timeout
    while True:
        result = cp.kubectl("explain", field, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return result.stdout
        time.sleep(1)


def test_kubectl_explain_shows_the_contract_descriptions(control_plane: ControlPlane):
    assert "Strength of the implicit KL constraint to the reference model." in explain(
        control_plane, "finetunejob.spec.stages.dpo.beta"
    )
    assert "Evaluation metrics reported by the stage" in explain(control_plane, "ftj.status.stages.metrics")


def test_quickstart_is_accepted_and_stored_as_written(control_plane: ControlPlane, namespace: str):
    apply_quickstart(control_plane, namespace)
    spec = get_job(control_plane, namespace)["spec"]
    # No defaults are stored: what a job leaves out stays out, for a runtime's defaults to fill (the operator applies
    # the model's own defaults when it reads the spec).
    assert spec == yaml.safe_load(QUICKSTART.read_text())["spec"]


def local_fields(path: Path) -> list[str]:
    """The fields `finetune run` names when it refuses the manifest (none when it accepts it)."""
    try:
        load_manifest(path)
    except ManifestError as exc:
        return [problem.split(": ")[1] for problem in exc.problems]
    return []


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_both_layers_refuse_each_invalid_example_naming_the_same_field(
    control_plane: ControlPlane, namespace: str, path: Path
):
    """One set of rules, two enforcers: the API server (server-side dry run) and the local loader agree."""
    text = path.read_text()
    field = re.search(r"^# field: (\S+)$", text, re.M).group(1)
    answer = re.search(r"^# kubectl apply answers: (.+)$", text, re.M).group(1)
    assert field in local_fields(path), (field, local_fields(path))
    result = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"{path.name} was accepted"
    error = one_line(result.stderr)
    assert answer in error, error
    if not re.search(r"^# refused by: kubectl$", text, re.M):
        # kubectl refuses a few documents itself, naming only their line; everything else the API server names.
        server_field = re.search(r"^# the API server names: (\S+)", text, re.M)
        assert (server_field.group(1) if server_field else field) in error, error
    assert not control_plane.kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout.strip()


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_both_layers_accept_each_valid_example(control_plane: ControlPlane, namespace: str, path: Path):
    assert local_fields(path) == []
    control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))


def test_a_two_mebibyte_field_is_refused_by_both_layers(control_plane: ControlPlane, namespace: str, tmp_path: Path):
    job = yaml.safe_load(QUICKSTART.read_text())
    job["spec"]["model"]["chatTemplate"] = "x" * (2 << 20)
    manifest = tmp_path / "huge.yaml"
    manifest.write_text(yaml.safe_dump(job))
    assert "spec.model.chatTemplate" in local_fields(manifest)
    # `create` rather than `apply`: apply would first refuse the oversized last-applied annotation.
    result = control_plane.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(job), check=False
    )
    assert result.returncode != 0
    assert "spec.model.chatTemplate: Too long: may not be" in one_line(result.stderr), result.stderr[:2000]


def test_a_long_uri_in_every_stage_stays_within_the_cel_cost_budget(control_plane: ControlPlane, namespace: str):
    """The CRD was accepted (its estimated cost fits); a job at the limits is evaluated within the runtime budget."""
    job = yaml.safe_load(QUICKSTART.read_text())
    stage = {key: value for key, value in job["spec"]["stages"][1].items() if key != "datasets"}
    longest = "pvc://data/" + "a/" * ((4096 - len("pvc://data/")) // 2)
    job["spec"]["stages"] = [
        {**stage, "name": f"s{i}", "dataset": {"uri": longest, "validationUri": longest}} for i in range(16)
    ]
    control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(job))


def test_null_means_unset_as_in_the_contract(control_plane: ControlPlane, namespace: str):
    job = yaml.safe_load(QUICKSTART.read_text())
    job["spec"]["model"]["revision"] = None
    job["spec"]["stages"][1]["rewardFrom"] = None  # would be refused on an sft stage if it were kept
    job["spec"]["activeDeadlineSeconds"] = None
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    spec = get_job(control_plane, namespace)["spec"]
    assert "revision" not in spec["model"] and "rewardFrom" not in spec["stages"][1]
    assert "activeDeadlineSeconds" not in spec


def test_fractional_bounds_hold_for_integral_values(control_plane: ControlPlane, namespace: str):
    apply_quickstart(control_plane, namespace)
    stages = get_job(control_plane, namespace)["spec"]["stages"]
    stages[3]["dpo"]["labelSmoothing"] = 0.5
    refused = patch(control_plane, namespace, {"spec": {"stages": stages}})
    assert refused.returncode != 0 and "spec.stages[3].dpo.labelSmoothing" in refused.stderr
    assert "must be less than 0.5" in refused.stderr
    stages[3]["dpo"]["labelSmoothing"] = 0
    patch(control_plane, namespace, {"spec": {"stages": stages}}, check=True)


def test_status_is_validated_and_shown_in_columns(control_plane: ControlPlane, namespace: str):
    apply_quickstart(control_plane, namespace)
    status = {
        "phase": "Running",
        "currentStage": "sft",
        "progress": "1/4",
        "startTime": "2026-01-01T00:00:00Z",
        "conditions": [
            {"type": "Running", "status": "True", "reason": "StageRunning", "message": "sft"},
            {"type": "Ready", "status": "False", "reason": "StageRunning", "message": "stage sft running step 3/40"},
        ],
        "stages": [{"name": "cpt", "type": "cpt", "phase": "Succeeded", "metrics": {"eval_loss_after": 1.5}}],
    }
    patch(control_plane, namespace, {"status": status}, "--subresource=status", check=True)
    stored = get_job(control_plane, namespace)["status"]
    assert stored["stages"][0]["metrics"] == {"eval_loss_after": 1.5} and stored["stages"][0]["attempts"] == 0
    table = control_plane.kubectl("get", "ftj", "-n", namespace).stdout.split("\n")
    assert table[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "REASON", "AGE"]
    assert table[1].split()[:5] == ["quickstart", "Running", "sft", "1/4", "StageRunning"]
    wide = control_plane.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout.split("\n")
    assert wide[0].split()[-1] == "MESSAGE" and wide[1].endswith("stage sft running step 3/40")
    assert (
        "finetunejob.finetune.dev/quickstart"
        in control_plane.kubectl("get", "finetune", "-n", namespace, "-o", "name").stdout
    )
    wrong = patch(control_plane, namespace, {"status": {"phase": "Exploded"}}, "--subresource=status")
    assert wrong.returncode != 0 and "status.phase" in wrong.stderr and "Unsupported value" in wrong.stderr


def test_stages_are_immutable_once_started(control_plane: ControlPlane, namespace: str):
    apply_quickstart(control_plane, namespace)
    stages = get_job(control_plane, namespace)["spec"]["stages"]
    # Before the operator records a start, the pipeline may still be edited.
    stages[0]["training"]["maxSteps"] = 41
    patch(control_plane, namespace, {"spec": {"stages": stages}}, check=True)

    patch(
        control_plane,
        namespace,
        {"status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}},
        "--subresource=status",
        check=True,
    )
    stages[0]["training"]["maxSteps"] = 42
    refused = patch(control_plane, namespace, {"spec": {"stages": stages}})
    assert refused.returncode != 0
    assert "spec.stages" in refused.stderr and "cannot be changed once the job has started" in refused.stderr
    refused = patch(control_plane, namespace, {"spec": {"stages": stages[:2]}})
    assert refused.returncode != 0 and "cannot be changed once the job has started" in refused.stderr
    # Nor anything else the pipeline runs with: a later stage would otherwise train with settings the first did not.
    for change in (
        {"training": {"learningRate": 0.777}},
        {"resources": {"workers": 7}},
        {"storage": {"uri": "./elsewhere"}},
        {"envFromSecrets": ["late"]},
    ):
        refused = patch(control_plane, namespace, {"spec": change})
        (field,) = change
        assert refused.returncode != 0 and f"spec.{field}: Forbidden: spec.{field} cannot be changed" in refused.stderr

    # Suspension and the deadlines stay editable: Kueue and users flip them on running jobs.
    patch(
        control_plane,
        namespace,
        {"spec": {"suspend": True, "ttlSecondsAfterFinished": 600, "activeDeadlineSeconds": 7200}},
        check=True,
    )
    spec = get_job(control_plane, namespace)["spec"]
    assert spec["suspend"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["stages"][0]["training"]["maxSteps"] == 41


URIS = [
    "./models/tiny",
    "../relative",
    "org/name",
    "file:///data/x",
    "s3://bucket/a/b",
    "pvc://claim-1/a/b.jsonl",
    "hf://org/name",
    "   ",
    " ./x",
    "s4://x/y",
    "http://example.com/x",
    "S3://bucket/x",
    "s3:/bucket/x",
    "pvc:///etc",
    "pvc://Claim/x",
    "pvc://ckpts/../../etc",
    "pvc://ckpts/a/..",
    "s3://bucket/../x",
    "pvc://ckpts//etc",
    "s3://ab",
    "hf://a/b/c",
    "file://",
]
URI_FIELDS = {
    "spec.storage.uri": lambda job, uri: job["spec"]["storage"].update(uri=uri),
    "spec.stages[0].dataset.validationUri": lambda job, uri: job["spec"]["stages"][0]["dataset"].update(
        validationUri=uri
    ),
    "spec.model.tokenizer": lambda job, uri: job["spec"]["model"].update(tokenizer=uri),
}


@pytest.mark.parametrize("field", URI_FIELDS)
def test_the_api_server_and_the_contract_agree_on_every_uri(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, field: str
):
    disagreements = []
    for uri in URIS:
        job = yaml.safe_load(QUICKSTART.read_text())
        URI_FIELDS[field](job, uri)
        manifest = tmp_path / "job.yaml"
        manifest.write_text(yaml.safe_dump(job))
        local = field in local_fields(manifest)
        result = control_plane.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(job), check=False
        )
        server = result.returncode != 0 and field in result.stderr
        if local != server or (result.returncode != 0) != server:
            disagreements.append((uri, local, one_line(result.stderr)))
    assert not disagreements
