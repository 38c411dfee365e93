"""Leader election against a real kube-apiserver: the Lease protocol alone, with short leases, then two operator
processes with the production timings and the chart's RBAC."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from finetune_api.render import rayjob_name
from finetune_dev.testing import OperatorProcess, install_chart_rbac
from finetune_operator.kube import FINETUNEJOB, LEASE, RAYJOB, Kube, is_status
from finetune_operator.leader import LeadershipError, LeaseElector, micro_time

LEASE_SECONDS, DEADLINE_SECONDS, RETRY_SECONDS = 3, 2.0, 0.5
# Scheduling and API latency on a busy test machine.
SLACK_SECONDS = 1.0


@pytest.fixture
def admin(control_plane) -> Kube:
    return Kube.connect(str(control_plane.kubeconfig))


def elector(kube: Kube, namespace: str, lease: str, identity: str) -> LeaseElector:
    return LeaseElector(
        kube,
        namespace,
        lease,
        identity,
        lease_seconds=LEASE_SECONDS,
        renew_deadline_seconds=DEADLINE_SECONDS,
        retry_seconds=RETRY_SECONDS,
    )


def lease_spec(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(LEASE, namespace, name)["spec"]


def take_over(kube: Kube, namespace: str, name: str, holder: str) -> None:
    """Write another holder into the lease, as a replica taking it over would (again if the holder renewed meanwhile)."""
    while True:
        lease = kube.get(LEASE, namespace, name)
        lease["spec"].update(holderIdentity=holder, renewTime=micro_time(datetime.now(UTC)))
        try:
            kube.request("PUT", Kube.path(LEASE, namespace, name), lease)
            return
        except ApiException as exc:
            if not is_status(exc, 409):
                raise


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 30))


async def timed(awaitable: Any, limit: float) -> float:
    began = time.monotonic()
    await asyncio.wait_for(awaitable, limit)
    return time.monotonic() - began


def test_one_elector_leads_and_a_standby_takes_over_when_it_stops_renewing(admin: Kube, namespace: str):
    async def scenario():
        first, second = elector(admin, namespace, "ops", "a"), elector(admin, namespace, "ops", "b")
        await asyncio.wait_for(first.acquire(), SLACK_SECONDS)  # no lease yet: created
        holding = asyncio.create_task(first.hold())
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(LEASE_SECONDS + 1)  # longer than a lease: only renewals keep the standby out
        assert not waiting.done() and lease_spec(admin, namespace, "ops")["holderIdentity"] == "a"
        # The holder dies without a word (SIGKILL): the standby takes over once the last renewal expires.
        holding.cancel()
        takeover = await timed(waiting, LEASE_SECONDS + RETRY_SECONDS + SLACK_SECONDS)
        print(f"takeover {takeover:.1f}s after the holder stopped (lease {LEASE_SECONDS}s, retry {RETRY_SECONDS}s)")
        spec = lease_spec(admin, namespace, "ops")
        assert (spec["holderIdentity"], spec["leaseTransitions"], spec["leaseDurationSeconds"]) == ("b", 1, 3)

    run(scenario())


def test_an_elector_restarted_under_its_identity_resumes_its_lease_at_once(admin: Kube, namespace: str):
    async def scenario():
        await elector(admin, namespace, "ops", "a").acquire()
        before = lease_spec(admin, namespace, "ops")
        # A new process, same pod name, the lease still valid: no waiting out its own lease.
        await asyncio.wait_for(elector(admin, namespace, "ops", "a").acquire(), SLACK_SECONDS)
        after = lease_spec(admin, namespace, "ops")
        assert after["renewTime"] > before["renewTime"]
        assert (after["acquireTime"], after["leaseTransitions"]) == (before["acquireTime"], 0)

    run(scenario())


def test_a_released_lease_is_taken_at_once(admin: Kube, namespace: str):
    async def scenario():
        first, second = elector(admin, namespace, "ops", "a"), elector(admin, namespace, "ops", "b")
        await first.acquire()
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(RETRY_SECONDS * 2)
        assert not waiting.done()
        await first.release()
        await asyncio.wait_for(waiting, RETRY_SECONDS + SLACK_SECONDS)  # not a lease later
        assert lease_spec(admin, namespace, "ops")["leaseTransitions"] == 1
        await first.release()  # no longer its lease: left alone
        assert lease_spec(admin, namespace, "ops")["holderIdentity"] == "b"

    run(scenario())


def test_the_holder_gives_up_when_another_holds_the_lease_or_renewals_fail(admin: Kube, namespace: str):
    async def scenario():
        taken = elector(admin, namespace, "taken", "a")
        await taken.acquire()
        take_over(admin, namespace, "taken", "intruder")
        with pytest.raises(LeadershipError, match="lease .*/taken was taken over by intruder"):
            await asyncio.wait_for(taken.hold(), RETRY_SECONDS + SLACK_SECONDS)

        cut_off = elector(admin, namespace, "cut-off", "a")
        await cut_off.acquire()
        # From now on no request reaches the API server.
        unreachable = kubernetes.client.Configuration()
        unreachable.host = "https://127.0.0.1:9"
        cut_off.kube = Kube(unreachable)
        with pytest.raises(LeadershipError, match="lease .*/cut-off was not renewed for 2s"):
            await asyncio.wait_for(cut_off.hold(), DEADLINE_SECONDS + SLACK_SECONDS)

    run(scenario())


def one_stage_job(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "s3://models/base"},
            "storage": {"uri": f"s3://runs/{name}"},
            "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}}],
        },
    }


def seconds_until_reconciled(admin: Kube, namespace: str, operator: OperatorProcess, timeout: float) -> float:
    """Create a job and time until its first RayJob exists: someone acts on it."""
    name = f"job-{uuid.uuid4().hex[:6]}"
    began = time.monotonic()
    admin.create(one_stage_job(name, namespace))
    while admin.get(RAYJOB, namespace, rayjob_name(name, "sft", 1)) is None:
        if time.monotonic() - began > timeout:
            status = (admin.get(FINETUNEJOB, namespace, name) or {}).get("status")
            pytest.fail(f"{name} not reconciled in {timeout:.0f}s ({status})\n{operator.log_tail()}")
        time.sleep(0.2)
    return time.monotonic() - began


def test_a_standby_operator_takes_over_within_20s_of_the_leader_being_killed(
    control_plane, admin: Kube, namespace: str, tmp_path: Path
):
    release = f"op-{namespace}"
    kubeconfig = install_chart_rbac(control_plane, release, namespace, "kuberay", [namespace])
    lease = f"{release}-finetune-operator"  # the chart's default, which its Role names

    def replica(pod: str) -> OperatorProcess:
        env = {"POD_NAME": pod, "POD_NAMESPACE": namespace, "FINETUNE_LEASE_NAME": lease}
        return OperatorProcess(
            kubeconfig, tmp_path / f"{pod}.log", "kuberay", (namespace,), env=env, leader_election=True
        )

    leader, standby = replica("operator-a"), replica("operator-b")
    with leader, standby:
        assert lease_spec(admin, namespace, lease)["holderIdentity"] == "operator-a"
        seconds_until_reconciled(admin, namespace, leader, timeout=30)
        leader.kill()
        takeover = seconds_until_reconciled(admin, namespace, standby, timeout=30)
        spec = lease_spec(admin, namespace, lease)
        assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("operator-b", 1)

        # Its container restarted in place (same pod name): it resumes its own lease instead of waiting it out.
        standby.kill()
        restarted = time.monotonic()
        standby.start()
        seconds_until_reconciled(admin, namespace, standby, timeout=30)
        resume = time.monotonic() - restarted
        assert lease_spec(admin, namespace, lease)["leaseTransitions"] == 1

        # A clean shutdown hands the lease back.
        standby.stop()
        assert standby.process.returncode == 0
        assert "holderIdentity" not in lease_spec(admin, namespace, lease)

        # A holder that finds the lease taken stops acting and exits non-zero, for Kubernetes to restart it.
        standby.start()
        take_over(admin, namespace, lease, "intruder")
        assert standby.process.wait(timeout=20) == 1
        assert "was taken over by intruder" in standby.log_tail()
    print(f"takeover after SIGKILL of the leader: {takeover:.1f}s; restart to reconciling: {resume:.1f}s")
    assert takeover <= 20
    assert resume < 15  # a lease: what waiting out its own lease would have cost at least
