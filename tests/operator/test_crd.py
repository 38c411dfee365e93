"""The FineTuneJob CRD is generated from the pydantic contract, is structural, and the committed copies are current."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import uris
from finetune_api.manifest import ManifestError, load_manifest
from finetune_api.spec import (
    DATASET_SCHEMES,
    MODEL_SCHEMES,
    OPTION_STAGES,
    STORAGE_SCHEMES,
    PeftSpec,
    ResourcesSpec,
    StageType,
)
from finetune_dev import crdgen
from finetune_dev.testing import source_env

pytestmark = pytest.mark.unit

REPO_ROOT = crdgen.REPO_ROOT
INVALID_EXAMPLES = sorted((REPO_ROOT / "examples" / "invalid").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.finetunejob_crd()


@pytest.fixture(scope="module")
def root(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_committed_files_match_the_contract():
    result = subprocess.run(
        [sys.executable, "-m", "finetune_dev.crdgen", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=source_env(),
    )
    assert result.returncode == 0, f"generated files drifted; run `make crds`:\n{result.stdout}{result.stderr}"


def test_check_reports_drift_with_a_diff(tmp_path: Path):
    expected = crdgen.generated_files()[REPO_ROOT / "crds" / crdgen.CRD_FILE]
    stale = tmp_path / "stale.yaml"
    stale.write_text(expected.replace("shortNames:\n    - ftj", "shortNames:\n    - fj"))
    (diff,) = crdgen.check({stale: expected})
    assert "-    - fj\n" in diff and "+    - ftj\n" in diff
    (missing,) = crdgen.check({tmp_path / "absent.yaml": expected})
    assert "missing" in missing
    assert crdgen.check({stale: stale.read_text()}) == []


def test_names_scope_and_subresources(crd: dict[str, Any]):
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == ("FineTuneJob", "finetunejobs", "finetunejob")
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["finetune"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_read_the_status(crd: dict[str, Any]):
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Stage": ".status.currentStage",
        "Progress": ".status.progress",
        "Reason": '.status.conditions[?(@.type=="Ready")].reason',
        "Age": ".metadata.creationTimestamp",
        "Message": '.status.conditions[?(@.type=="Ready")].message',
    }


def test_schema_is_structural(root: dict[str, Any]):
    problems = []
    for path, node in walk(root):
        for forbidden in (
            "$ref",
            "$defs",
            "anyOf",
            "oneOf",
            "allOf",
            "const",
            "title",
            "examples",
            "nullable",
            "patternProperties",
        ):
            if forbidden in node:
                problems.append(f"{path}: {forbidden}")
        if "type" not in node:
            problems.append(f"{path}: no type")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties false")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties next to additionalProperties")
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node and not isinstance(node[bound], bool):
                problems.append(f"{path}: numeric {bound}")
        for bound in ("minimum", "maximum"):
            # Fractional bounds are truncated for integral values by the API server; they must be CEL rules.
            if isinstance(node.get(bound), float) and not node[bound].is_integer():
                problems.append(f"{path}: fractional {bound}")
    assert not problems


def test_every_property_is_described(root: dict[str, Any]):
    undocumented = [
        path
        for path, node in walk(root["properties"]["spec"], "spec")
        if not node.get("description") and not path.endswith(("[]", "{}"))
    ] + [
        path
        for path, node in walk(root["properties"]["status"], "status")
        if not node.get("description") and not path.endswith(("[]", "{}"))
    ]
    assert not undocumented


def test_status_is_strict_and_mirrors_the_status_model(root: dict[str, Any]):
    status = root["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert set(status["properties"]) == {
        "phase",
        "conditions",
        "observedGeneration",
        "currentStage",
        "progress",
        "startTime",
        "suspendedSeconds",
        "completionTime",
        "stages",
        "runtime",
        "effectiveSpec",
    }
    stage = status["properties"]["stages"]["items"]
    assert {
        "name",
        "type",
        "phase",
        "attempts",
        "rayJob",
        "checkpoint",
        "lastCheckpoint",
        "progress",
        "metrics",
    } <= set(stage["properties"])
    assert stage["properties"]["metrics"]["additionalProperties"] == {"type": "number"}
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["properties"]["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Suspended"]


def test_the_crd_stores_what_was_written_and_the_doc_shows_the_operators_defaults(root: dict[str, Any]):
    """No defaults in the CRD's spec: a field a job leaves out stays out, so a runtime's default can fill it."""
    assert [path for path, node in walk(root["properties"]["spec"], "spec") if "default" in node] == []
    spec = crdgen.spec_schema()["properties"]
    assert spec["backoffLimit"]["default"] == 2
    assert spec["suspend"]["default"] is False
    assert spec["envFromSecrets"]["default"] == []
    # default_factory models are written out in full.
    assert spec["peft"]["default"] == PeftSpec().to_wire()
    assert spec["resources"]["default"] == ResourcesSpec().to_wire()
    stage = spec["stages"]["items"]["properties"]
    assert stage["dataset"]["properties"]["format"]["default"] == "auto"
    assert stage["ppo"]["properties"]["klCoef"]["default"] == 0.05
    # Optional fields without a default get none.
    assert "default" not in spec["activeDeadlineSeconds"]


def test_constraints_come_from_the_field_definitions(root: dict[str, Any]):
    spec = root["properties"]["spec"]["properties"]
    stage = spec["stages"]["items"]
    assert (spec["stages"]["minItems"], spec["stages"]["maxItems"]) == (1, 16)
    assert stage["properties"]["name"]["maxLength"] == 30 and stage["properties"]["name"]["pattern"]
    assert stage["properties"]["type"]["enum"] == [t.value for t in StageType]
    assert stage["required"] == ["name", "type"]  # and one of dataset, datasets (a CEL rule)
    assert any("has(self.dataset) != has(self.datasets)" in r["rule"] for r in stage["x-kubernetes-validations"])
    zero = spec["deepspeed"]["properties"]["zeroStage"]
    assert (zero["minimum"], zero["maximum"]) == (0, 3)
    beta = stage["properties"]["dpo"]["properties"]["beta"]
    assert beta["minimum"] == 0 and beta["exclusiveMinimum"] is True
    smoothing = stage["properties"]["dpo"]["properties"]["labelSmoothing"]
    assert "maximum" not in smoothing and smoothing["x-kubernetes-validations"][0]["rule"] == "self < 0.5"
    node_selector = spec["resources"]["properties"]["nodeSelector"]
    assert node_selector["additionalProperties"] == {"type": "string", "maxLength": 63}
    assert node_selector["maxProperties"] == 64
    assert node_selector["x-kubernetes-validations"] == [
        {"rule": "self.all(k, size(k) <= 317)", "message": "keys must be at most 317 characters"},
        {"rule": "self.all(k, size(k) > 0)", "message": "keys must not be empty"},
    ]


def test_cel_rules_cover_the_cross_field_checks(root: dict[str, Any]):
    spec = root["properties"]["spec"]["properties"]
    stage_rules = {r["fieldPath"] for r in spec["stages"]["items"]["x-kubernetes-validations"]}
    assert stage_rules == {".rewardFrom", ".dataset", ".training", *(f".{option}" for option in OPTION_STAGES)}
    list_rules = [r["message"] for r in spec["stages"]["x-kubernetes-validations"]]
    assert list_rules == [
        "stage names must be unique",
        "rewardFrom must name an earlier stage of type reward",
        "export adapter writes no merged model, but a later stage loads it; use export both",
    ]
    # Rules reading the job's peft or training beside a stage's sit on the spec and name the stage in their message.
    job_rules = [r["message"] for r in root["properties"]["spec"]["x-kubernetes-validations"] if "stages" in r["rule"]]
    assert job_rules == [
        "export adapter and both need peft.method lora or qlora, not full",
        "training.earlyStopping requires training.evalSteps, the held-out evaluations it watches",
    ]
    # Once started, every spec field but the live ones is frozen, each by its own rule naming it.
    frozen = {r["fieldPath"]: r["rule"] for r in root["x-kubernetes-validations"]}
    assert set(frozen) == {f".spec.{name}" for name in spec} - {
        ".spec.suspend",
        ".spec.activeDeadlineSeconds",
        ".spec.ttlSecondsAfterFinished",
    }
    assert all("oldSelf.status.startTime" in rule for rule in frozen.values())
    assert "self.spec.stages == oldSelf.spec.stages" in frozen[".spec.stages"]
    # Every rule and message expression may only use strings the API server can bound (maxLength) for cost estimates.
    assert spec["stages"]["items"]["properties"]["rewardFrom"]["maxLength"] == 30


def test_reference_doc_lists_every_spec_field(root: dict[str, Any]):
    doc = (REPO_ROOT / "docs" / "crd-reference.md").read_text()
    for path, _ in walk(root["properties"]["spec"], "spec"):
        if path.count(".") and not path.endswith(("[]", "{}")):
            assert f"| `{path}` |" in doc, path


@pytest.mark.parametrize("path", INVALID_EXAMPLES, ids=[p.stem for p in INVALID_EXAMPLES])
def test_invalid_examples_are_also_rejected_by_the_contract(path: Path):
    """The CRD and pydantic agree: every manifest the API server must refuse, `finetune run` refuses too, at the same place."""
    field = re.search(r"^# field: (\S+)$", path.read_text(), re.M).group(1)
    with pytest.raises(ManifestError) as raised:
        load_manifest(path)
    places = [problem.split(": ")[1] for problem in raised.value.problems]
    assert field in places, (field, raised.value.problems)


def test_cluster_quickstart_is_the_local_quickstart_with_its_own_storage():
    cluster = load_manifest(REPO_ROOT / "examples" / "quickstart-k8s.yaml").spec
    local = load_manifest(REPO_ROOT / "examples" / "quickstart.yaml").spec
    assert [s.type for s in cluster.stages] == ["cpt", "sft", "reward", "dpo"]
    assert cluster.storage.uri != local.storage.uri
    assert cluster.model_dump(exclude={"storage"}) == local.model_dump(exclude={"storage"})


def test_generated_yaml_has_no_anchors():
    text = (REPO_ROOT / "crds" / crdgen.CRD_FILE).read_text()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def test_every_spec_value_is_bounded(root: dict[str, Any]):
    """Strings, lists, maps and numbers all have limits: the API server's CEL cost estimates need them, and a 2 MiB
    string would otherwise reach the stage launch."""
    unbounded = []
    for path, node in walk(root["properties"]["spec"], "spec"):
        kind = node.get("type")
        if kind == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(f"{path}: string without maxLength")
        elif kind == "array" and "maxItems" not in node:
            unbounded.append(f"{path}: list without maxItems")
        elif kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(f"{path}: map without maxProperties")
        elif kind in ("integer", "number"):
            rules = " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))
            if "maximum" not in node and "self <" not in rules:
                unbounded.append(f"{path}: number without maximum")
            if "minimum" not in node and "self >" not in rules:
                unbounded.append(f"{path}: number without minimum")
    assert not unbounded


def test_uri_fields_carry_the_contracts_uri_rules_as_cel(root: dict[str, Any]):
    """The CEL on each URI field is generated from the same rules `finetune_api.uris` checks in Python."""
    spec = root["properties"]["spec"]["properties"]
    dataset = spec["stages"]["items"]["properties"]["dataset"]["properties"]
    fields = {
        "spec.model.source": (spec["model"]["properties"]["source"], MODEL_SCHEMES),
        "spec.model.tokenizer": (spec["model"]["properties"]["tokenizer"], MODEL_SCHEMES),
        "spec.storage.uri": (spec["storage"]["properties"]["uri"], STORAGE_SCHEMES),
        "spec.stages[].dataset.uri": (dataset["uri"], DATASET_SCHEMES),
        "spec.stages[].dataset.validationUri": (dataset["validationUri"], DATASET_SCHEMES),
    }
    for path, (node, schemes) in fields.items():
        assert node["x-kubernetes-validations"] == uris.cel_rules(schemes), path
        assert node["maxLength"] == uris.URI_MAX_LENGTH and node["minLength"] == 1, path
    storage_rules = " ".join(r["rule"] for r in spec["storage"]["properties"]["uri"]["x-kubernetes-validations"])
    assert "hf://" not in storage_rules and "(s3|pvc|file)://" in storage_rules


def test_unions_other_than_optional_have_no_crd_form():
    from pydantic import BaseModel

    class Optional(BaseModel):
        value: int | None = None

    class Either(BaseModel):
        value: int | str

    schema = Optional.model_json_schema(schema_generator=crdgen.StructuralSchema)
    assert schema["properties"]["value"] == {"type": "integer"}
    with pytest.raises(crdgen.SchemaError, match="only `X | None` unions"):
        Either.model_json_schema(schema_generator=crdgen.StructuralSchema)
