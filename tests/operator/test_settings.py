"""Operator settings (environment < flags) and the status merge patch."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.__main__ import build_parser
from finetune_operator.controller import merge_patch
from finetune_operator.handlers import replica_priority
from finetune_operator.settings import from_env

pytestmark = pytest.mark.unit


def environment(monkeypatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_environment_then_flags(monkeypatch):
    env = {
        "FINETUNE_EXECUTOR": "local",
        "FINETUNE_NAMESPACES": "ml, research",
        "FINETUNE_METRICS_PORT": "9090",
        "FINETUNE_STANDALONE": "true",
        "FINETUNE_RETRY_BASE_SECONDS": "0.5",
        "FINETUNE_STATE_DIR": "/var/lib/ft",
        "FINETUNE_PEERING": "",
    }
    environment(monkeypatch, env)
    settings = from_env()
    assert (settings.executor, settings.namespaces, settings.metrics_port) == ("local", ("ml", "research"), 9090)
    assert (settings.standalone, settings.retry_base_seconds, settings.state_dir, settings.peering) == (
        True,
        0.5,
        Path("/var/lib/ft"),
        None,
    )
    assert not settings.clusterwide
    assert from_env(executor="kuberay", metrics_port=None).executor == "kuberay"
    monkeypatch.setenv("FINETUNE_NAMESPACES", "")
    assert from_env().clusterwide


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FINETUNE_EXECUTOR": "slurm"}, "FINETUNE_EXECUTOR='slurm': Input should be 'kuberay' or 'local'"),
        ({"FINETUNE_METRICS_PORT": "eighty"}, "FINETUNE_METRICS_PORT='eighty': Input should be a valid integer"),
        ({"FINETUNE_STANDALONE": "maybe"}, "FINETUNE_STANDALONE='maybe': Input should be a valid boolean"),
        ({"FINETUNE_STANDALONE": "1", "FINETUNE_PEERING": "ops"}, "--peering and --standalone exclude each other"),
    ],
)
def test_bad_settings_are_named(monkeypatch, env, message):
    environment(monkeypatch, env)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        from_env()
    monkeypatch.delenv(next(iter(env)))
    with pytest.raises(ValueError, match="--metrics-port='x': Input should be a valid integer"):
        from_env(metrics_port="x")


def test_cli_flags():
    args = build_parser().parse_args(
        ["run", "--executor", "local", "-n", "a", "-n", "b", "--standalone", "--health-port", "0"]
    )
    assert (args.executor, args.namespaces, args.standalone, args.health_port) == ("local", ["a", "b"], True, 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--peering", "x", "--standalone"])


def test_merge_patch_replaces_changed_keys_and_removes_dropped_ones():
    old = {
        "phase": "Running",
        "currentStage": "sft",
        "stages": [{"name": "sft", "phase": "Running"}],
        "progress": "0/1",
    }
    new = {"phase": "Succeeded", "stages": [{"name": "sft", "phase": "Succeeded"}], "progress": "0/1"}
    assert merge_patch(old, new) == {
        "phase": "Succeeded",
        "stages": [{"name": "sft", "phase": "Succeeded"}],
        "currentStage": None,
    }
    assert merge_patch(new, new) == {}


def test_replicas_get_distinct_stable_peering_priorities():
    names = [f"finetune-operator-7d9c8b-{suffix}" for suffix in ("abcde", "fghij", "klmno")]
    priorities = [replica_priority(name) for name in names]
    assert len(set(priorities)) == len(names)
    assert priorities == [replica_priority(name) for name in names]
    assert all(1 <= p <= 1_000_000 for p in priorities)


def test_pull_secrets_and_start_timeout_come_from_the_environment(monkeypatch):
    environment(
        monkeypatch, {"FINETUNE_IMAGE_PULL_SECRETS": "regcred, mirror", "FINETUNE_START_TIMEOUT_SECONDS": "600"}
    )
    settings = from_env()
    assert (settings.image_pull_secrets, settings.start_timeout_seconds) == (("regcred", "mirror"), 600.0)
    monkeypatch.setenv("FINETUNE_IMAGE_PULL_SECRETS", "")
    monkeypatch.delenv("FINETUNE_START_TIMEOUT_SECONDS")
    defaults = from_env()
    assert (defaults.image_pull_secrets, defaults.start_timeout_seconds) == ((), 1200.0)
