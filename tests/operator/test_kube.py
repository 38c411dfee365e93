"""The credential refresh runs at most every few seconds, however often the kubeconfig loader's hook reinstalls itself."""

import kubernetes

from finetune_operator import kube


class ReinstallingHook:
    """Like the kubeconfig loader's hook (kube_config.py `_set_config`): each call re-applies the credentials and
    installs a fresh copy of itself on the configuration."""

    def __init__(self, calls: list[str], generation: int = 0):
        self.calls, self.generation = calls, generation

    def __call__(self, configuration: kubernetes.client.Configuration) -> None:
        self.calls.append(f"refresh {self.generation}")
        configuration.api_key["authorization"] = f"Bearer token-{self.generation}"
        configuration.refresh_api_key_hook = ReinstallingHook(self.calls, self.generation + 1)


def configuration_with(hook) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    configuration.refresh_api_key_hook = hook
    return configuration


def test_requests_within_the_interval_share_one_refresh(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(kube.time, "monotonic", lambda: now[0])
    calls: list[str] = []
    configuration = configuration_with(ReinstallingHook(calls))
    kube.throttle_credential_refresh(configuration, seconds=10)

    for _ in range(5):  # what the client does before each request
        configuration.refresh_api_key_hook(configuration)
    assert calls == ["refresh 0"]
    assert configuration.api_key["authorization"] == "Bearer token-0"

    now[0] += 10  # the next refresh goes to the loader's newest self, and the throttle stays in front of it
    configuration.refresh_api_key_hook(configuration)
    configuration.refresh_api_key_hook(configuration)
    assert calls == ["refresh 0", "refresh 1"]
    assert configuration.api_key["authorization"] == "Bearer token-1"
    assert not isinstance(configuration.refresh_api_key_hook, ReinstallingHook)

    now[0] += 25
    configuration.refresh_api_key_hook(configuration)
    assert calls == ["refresh 0", "refresh 1", "refresh 2"]


def test_a_hook_that_stays_in_place_is_kept():
    calls: list[str] = []

    def static_hook(configuration: kubernetes.client.Configuration) -> None:
        calls.append("refresh")

    configuration = configuration_with(static_hook)
    kube.throttle_credential_refresh(configuration, seconds=0)
    for _ in range(3):
        configuration.refresh_api_key_hook(configuration)
    assert calls == ["refresh"] * 3


def test_credentials_without_a_hook_are_left_alone():
    configuration = configuration_with(None)
    kube.throttle_credential_refresh(configuration, seconds=10)
    assert configuration.refresh_api_key_hook is None
