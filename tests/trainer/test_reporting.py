"""The progress channel: file and ConfigMap reporters, throttling, report URLs, and the lazy recipe registry."""

import json

import pytest

from finetune_api.report import REPORT_KEY, StageReport
from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes import RECIPES
from finetune_trainer.reporting import (
    ConfigMapReporter,
    FileReporter,
    ReportChannel,
    TokenRate,
    format_report,
    reporter_from_url,
)

pytestmark = pytest.mark.unit


class FakeCoreV1:
    def __init__(self, status=None, failures=None):
        self.patches, self.status = [], status
        self.failures = failures  # fail this many calls, then succeed (None: fail every call when status is set)

    def patch_namespaced_config_map(self, name, namespace, body, _request_timeout=None):
        from kubernetes.client.exceptions import ApiException

        assert _request_timeout is not None  # a hung API server must not hang the trainer

        if self.status and (self.failures is None or self.failures > 0):
            self.failures = None if self.failures is None else self.failures - 1
            raise ApiException(status=self.status, reason="Unavailable")
        self.patches.append((namespace, name, body))

    def create_namespaced_config_map(self, *args, **kwargs):  # the trainer must never create the ConfigMap
        raise AssertionError("create is not allowed")


def test_file_reporter_writes_the_wire_shape(tmp_path):
    path = tmp_path / "r" / "report.json"
    channel = ReportChannel(FileReporter(path, min_interval=0), attempt=2)
    channel.progress(3, 10, loss=1.5, eta=7.0)
    wire = json.loads(path.read_text())
    assert wire["phase"] == "Running" and wire["step"] == 3 and wire["totalSteps"] == 10 and wire["attempt"] == 2
    channel.checkpoint("s3://b/ckpt/checkpoint-3", 3)
    channel.succeeded({"eval_loss_after": 0.5}, "s3://b/model")
    final = StageReport.model_validate(json.loads(path.read_text()))
    assert (
        final.phase == "Succeeded"
        and final.checkpoint == "s3://b/model"
        and final.last_checkpoint == "s3://b/ckpt/checkpoint-3"
    )
    assert final.metrics == {"eval_loss_after": 0.5} and final.updated_at


def test_throughput_is_the_tokens_trained_since_the_last_log_over_the_seconds_since_it():
    times = iter([100.0, 102.0, 103.5, 104.0, 106.0])
    rate = TokenRate(clock=lambda: next(times))
    rate.mark(4096)  # e.g. resumed: the count goes on from the checkpoint's
    assert rate.rate(4096 + 2 * 1024) == 1024.0  # two 1024-token steps in 2 s
    assert rate.rate(6144 + 3 * 1024) == 2048.0  # three more in 1.5 s: the latest interval alone
    assert rate.rate(9216) is None  # a trainer that counts no tokens shows no throughput, not 0
    assert rate.rate(9216 + 1000) == 500.0


def test_no_throughput_before_the_clock_starts():
    assert TokenRate(clock=lambda: 5.0).rate(1024) is None


def test_progress_carries_tokens_per_second_to_the_wire_and_the_progress_line(tmp_path):
    path = tmp_path / "report.json"
    channel = ReportChannel(FileReporter(path, min_interval=0), attempt=1)
    channel.progress(20, 80, loss=1.11894, eta=12.4, tokens_per_second=20480.4)
    wire = json.loads(path.read_text())
    assert wire["tokensPerSecond"] == 20480.4
    report = StageReport.model_validate(wire)
    assert format_report("sft", report) == "[sft] step 20/80 loss 1.1189 20,480 tok/s eta 0:12"
    channel.progress(25, 80, loss=1.0, eta=10.0)  # an interval without a measure keeps the last one
    assert json.loads(path.read_text())["tokensPerSecond"] == 20480.4


def test_configmap_reporter_patches_only_and_throttles():
    reporter = ConfigMapReporter("team-a", "job-sft-report", min_interval=60)
    reporter._client = FakeCoreV1()
    channel = ReportChannel(reporter, attempt=1)
    channel.progress(1, 10, loss=2.0)
    reporter.flush()
    channel.progress(2, 10, loss=1.9)  # within the interval: dropped
    channel.checkpoint("/ckpt/checkpoint-2", 2)  # urgent: always written
    reporter.flush()
    channel.failed("InvalidDataset", "bad line")
    patches = reporter._client.patches
    assert [p[:2] for p in patches] == [("team-a", "job-sft-report")] * 3
    reports = [json.loads(p[2]["data"][REPORT_KEY]) for p in patches]
    assert (
        [r["step"] for r in reports] == [1, 2, 2]
        and reports[-1]["phase"] == "Failed"
        and reports[-1]["reason"] == "InvalidDataset"
    )


def test_configmap_reporter_survives_a_missing_configmap(capsys):
    reporter = ConfigMapReporter("ns", "gone")
    reporter._client = FakeCoreV1(status=404)
    reporter.publish(StageReport(phase="Running"), urgent=True)
    reporter.flush()
    assert "cannot patch ConfigMap ns/gone (try 1/1): 404" in capsys.readouterr().err


def test_configmap_reporter_retries_the_final_report_only(monkeypatch):
    monkeypatch.setattr("finetune_trainer.reporting.time.sleep", lambda seconds: None)
    reporter = ConfigMapReporter("ns", "job-rm-report")
    reporter._client = FakeCoreV1(status=503, failures=2)
    reporter.publish(StageReport(phase="Running", step=1), urgent=True)
    reporter.flush()
    assert reporter._client.patches == [] and reporter._client.failures == 1  # progress: one try, dropped
    reporter.publish(StageReport(phase="Succeeded", checkpoint="s3://b/rm/model"), urgent=True)
    [(_, _, body)] = reporter._client.patches
    assert json.loads(body["data"][REPORT_KEY])["phase"] == "Succeeded"


def test_reporters_pickle_without_clients():
    import pickle

    reporter = ConfigMapReporter("ns", "name")
    reporter._client = object()
    assert not hasattr(pickle.loads(pickle.dumps(reporter)), "_client")


def test_report_urls(tmp_path):
    assert isinstance(reporter_from_url(f"file://{tmp_path}/r.json"), FileReporter)
    configmap = reporter_from_url("configmap://ns/name")
    assert (configmap.namespace, configmap.name) == ("ns", "name")
    with pytest.raises(ValueError, match="configmap://NAMESPACE/NAME"):
        reporter_from_url("configmap://only-namespace")


def test_non_main_ranks_do_not_report(tmp_path):
    path = tmp_path / "report.json"
    ReportChannel(FileReporter(path, min_interval=0), attempt=1, enabled=False).progress(1, 2)
    assert not path.exists()


def test_recipe_registry_is_lazy_and_fails_per_type(monkeypatch):
    assert RECIPES["cpt"].run and RECIPES["sft"].run
    import importlib

    real_import = importlib.import_module

    def missing_grpo(name, *args):
        if name.endswith(".grpo"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing_grpo)
    with pytest.raises(ConfigError, match="stage type 'grpo' has no recipe"):
        RECIPES["grpo"]
    assert RECIPES["sft"].run
    with pytest.raises(KeyError):
        RECIPES["nonsense"]


def test_final_metrics_are_the_stages_results_without_the_last_progress_stats(tmp_path):
    path = tmp_path / "report.json"
    channel = ReportChannel(FileReporter(path, min_interval=0), attempt=1)
    channel.progress(20, 20, loss=0.3, score=1.7, kl=0.02)  # a custom loop's per-step stats
    channel.succeeded({"reward_mean_first": 0.1, "reward_mean_last": 1.2, "kl_mean": 0.01}, "s3://b/model")
    final = StageReport.model_validate(json.loads(path.read_text()))
    assert final.metrics == {"reward_mean_first": 0.1, "reward_mean_last": 1.2, "kl_mean": 0.01}


def test_progress_never_waits_for_a_slow_api_server():
    import threading

    release = threading.Event()

    class SlowCoreV1(FakeCoreV1):
        def patch_namespaced_config_map(self, name, namespace, body, _request_timeout=None):
            assert release.wait(30), "the API server stand-in was never released"
            super().patch_namespaced_config_map(name, namespace, body, _request_timeout)

    reporter = ConfigMapReporter("ns", "job.sft.report", min_interval=0)
    reporter._client = SlowCoreV1()
    for step in range(1, 6):
        reporter.publish(StageReport(phase="Running", step=step), urgent=True)
    # Every publish returned while the API server had answered nothing.
    assert reporter._client.patches == []
    release.set()
    reporter.publish(StageReport(phase="Succeeded", step=5), urgent=True)
    sent = [json.loads(p[2]["data"][REPORT_KEY]) for p in reporter._client.patches]
    # The latest snapshot wins while one is in flight (so at most one stale one goes out); the final report goes last.
    assert [r["step"] for r in sent] == sorted(r["step"] for r in sent) and len(sent) <= 3
    assert (sent[-1]["phase"], sent[-2]["step"]) == ("Succeeded", 5)


def test_a_pod_without_its_serviceaccount_token_is_a_clear_permanent_error(monkeypatch, tmp_path):
    from finetune_trainer import reporting, stage

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(reporting, "IN_CLUSTER_TOKEN", tmp_path / "absent" / "token")
    with pytest.raises(ValueError, match="automountServiceAccountToken: false"):
        reporter_from_url("configmap://ns/job.sft.report")
    assert stage.run_from_args(None, "{}", "configmap://ns/job.sft.report", use_ray=False) == 3
