"""The FineTuneRuntime and ClusterFineTuneRuntime CRDs: generated from the contract, structural, described, bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from finetune_api.runtime import CLUSTER_RUNTIME_KIND, LOCKABLE_FIELDS, RUNTIME_KIND
from finetune_dev import crdgen


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), dict):
            yield from walk(schema[key], f"{path}{suffix}")


@pytest.fixture(params=[RUNTIME_KIND, CLUSTER_RUNTIME_KIND])
def crd(request) -> dict[str, Any]:
    return crdgen.runtime_crd(request.param)


def spec_of(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_names_and_scope(crd: dict[str, Any]):
    names, scope = crd["spec"]["names"], crd["spec"]["scope"]
    if names["kind"] == RUNTIME_KIND:
        assert (names["plural"], names["shortNames"], scope) == ("finetuneruntimes", ["ftr"], "Namespaced")
    else:
        assert (names["plural"], names["shortNames"], scope) == ("clusterfinetuneruntimes", ["cftr"], "Cluster")
    assert names["categories"] == ["finetune"]
    assert "subresources" not in crd["spec"]["versions"][0]


def test_spec_holds_defaults_and_policy(crd: dict[str, Any]):
    spec = spec_of(crd)["properties"]
    assert set(spec) == {"defaults", "policy", "queueName"}
    assert "stages" not in spec["defaults"]["properties"] and "suspend" not in spec["defaults"]["properties"]
    assert spec["defaults"]["properties"]["resources"]["properties"]["nodeSelector"]["maxProperties"] == 64
    policy = spec["policy"]["properties"]
    assert set(policy) == {
        "maxWorkers",
        "maxGpusPerStage",
        "maxActiveDeadlineSeconds",
        "allowedStageTypes",
        "allowedImagePrefixes",
        "allowedModelPrefixes",
        "lockedFields",
    }
    assert policy["lockedFields"]["items"]["enum"] == list(LOCKABLE_FIELDS)


def test_structural_described_bounded_and_without_defaults(crd: dict[str, Any]):
    problems = []
    for path, node in walk(spec_of(crd), "spec"):
        if any(key in node for key in ("$ref", "anyOf", "const", "title", "default", "patternProperties")):
            problems.append(f"{path}: not structural or defaulted")
        if "type" not in node:
            problems.append(f"{path}: no type")
        if not node.get("description") and not path.endswith(("[]", "{}")):
            problems.append(f"{path}: no description")
        kind = node.get("type")
        if kind == "string" and "maxLength" not in node and "enum" not in node:
            problems.append(f"{path}: string without maxLength")
        elif kind == "array" and "maxItems" not in node:
            problems.append(f"{path}: list without maxItems")
        elif kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            problems.append(f"{path}: map without maxProperties")
        elif kind in ("integer", "number"):
            rules = " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))
            if "maximum" not in node and "self <" not in rules:
                problems.append(f"{path}: number without maximum")
    assert not problems


def test_reference_doc_lists_every_runtime_field():
    doc = (crdgen.REPO_ROOT / "docs" / "runtime-reference.md").read_text()
    for path, _ in walk(spec_of(crdgen.runtime_crd(RUNTIME_KIND)), "spec"):
        if path.count(".") and not path.endswith(("[]", "{}")):
            assert f"| `{path}` |" in doc, path
