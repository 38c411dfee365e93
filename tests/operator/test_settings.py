"""Operator settings (environment < flags) and the status merge patch."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.__main__ import build_parser
from finetune_operator.controller import merge_patch
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
        "FINETUNE_LEADER_ELECTION": "true",
        "FINETUNE_RETRY_BASE_SECONDS": "0.5",
        "FINETUNE_STATE_DIR": "/var/lib/ft",
        "FINETUNE_LEASE_NAME": "ops-lease",
    }
    environment(monkeypatch, env)
    settings = from_env()
    assert (settings.executor, settings.namespaces, settings.metrics_port) == ("local", ("ml", "research"), 9090)
    assert (settings.leader_election, settings.retry_base_seconds, settings.state_dir, settings.lease_name) == (
        True,
        0.5,
        Path("/var/lib/ft"),
        "ops-lease",
    )
    assert (settings.lease_seconds, settings.lease_renew_deadline_seconds, settings.lease_retry_seconds) == (15, 10, 2)
    assert not settings.clusterwide
    assert from_env(executor="kuberay", metrics_port=None).executor == "kuberay"
    monkeypatch.setenv("FINETUNE_NAMESPACES", "")
    assert from_env().clusterwide


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FINETUNE_EXECUTOR": "slurm"}, "FINETUNE_EXECUTOR='slurm': Input should be 'kuberay' or 'local'"),
        ({"FINETUNE_METRICS_PORT": "eighty"}, "FINETUNE_METRICS_PORT='eighty': Input should be a valid integer"),
        ({"FINETUNE_LEADER_ELECTION": "maybe"}, "FINETUNE_LEADER_ELECTION='maybe': Input should be a valid boolean"),
        ({"FINETUNE_LEASE_NAME": "Ops"}, "FINETUNE_LEASE_NAME='Ops': String should match pattern"),
        (
            {"FINETUNE_LEASE_RENEW_DEADLINE_SECONDS": "20"},
            "lease timings need lease_seconds > lease_renew_deadline_seconds > lease_retry_seconds > 0",
        ),
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
        ["run", "--executor", "local", "-n", "a", "-n", "b", "--leader-elect", "--health-port", "0"]
    )
    assert (args.executor, args.namespaces, args.leader_elect, args.health_port) == ("local", ["a", "b"], True, 0)
    # Unset, the environment decides.
    assert [build_parser().parse_args(["run", *flag]).leader_elect for flag in ([], ["--no-leader-elect"])] == [
        None,
        False,
    ]


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
