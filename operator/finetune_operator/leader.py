"""Leader election through a coordination.k8s.io/v1 Lease: of several operator replicas, only the holder acts.

The rules are client-go's (k8s.io/client-go/tools/leaderelection/leaderelection.go: tryAcquireOrRenew, renew and
release), so the Lease reads as kube-controller-manager's does:

* a replica takes the lease when it is absent, released (no holder), expired, or held under its own identity already:
  a replica restarted under the same pod name resumes at once instead of waiting out its own lease;
* every write replaces the object read just before, with its resourceVersion: of two replicas racing for the lease the
  API server lets one win and answers the other 409;
* the holder renews every retry period and stops acting once no renewal succeeded for the renew deadline, or once it
  finds another holder; the deadline is shorter than the lease, so it stops before a standby may take over;
* on a clean shutdown the holder releases the lease (client-go's ReleaseOnCancel), so a standby takes over at once.

One difference: client-go times a holder's expiry from when it saw the record change, on its own clock; here it is
renewTime + leaseDurationSeconds, on the holder's clock. That assumes node clocks in step (NTP), as the API server's
own tokens do, and it lets a standby that has just started take a dead holder's lease at once, not a lease later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import aiohttp.web
import kubernetes
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from finetune_api.timeutil import parse_time
from finetune_operator.kube import LEASE, Kube, is_status
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)
# What a failed API round raises: an answer from the API server, or none at all (timeouts, refused connections).
API_FAILURES = (ApiException, HTTPError, OSError)


class LeadershipError(RuntimeError):
    """This replica may not act, or may no longer: it must stop."""


def micro_time(moment: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 in UTC with microseconds (`2026-12-01T13:00:00.000000Z`)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expired(spec: dict[str, Any], now: datetime) -> bool:
    renewed = spec.get("renewTime")
    return not renewed or parse_time(renewed) + timedelta(seconds=spec.get("leaseDurationSeconds") or 0) < now


class LeaseElector:
    """Takes and keeps the Lease `namespace/name` for `identity`."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_seconds: int = 15,
        renew_deadline_seconds: float = 10.0,
        retry_seconds: float = 2.0,
    ):
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_seconds = lease_seconds
        self.renew_deadline_seconds = renew_deadline_seconds
        self.retry_seconds = retry_seconds
        # A thread of its own: renewals must not queue behind reconcile passes in the event loop's default executor.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lease")
        # Event-loop time at which the last successful round began: the lease is surely ours until then + deadline.
        self._renewed_at = 0.0

    def __str__(self) -> str:
        return f"lease {self.namespace}/{self.name}"

    async def acquire(self) -> None:
        """Return once this replica holds the lease, trying every retry period."""
        announced = None
        while (holder := await self._round()) != self.identity:
            if holder and holder != announced:
                log.info("%s is held by %s: standing by", self, holder)
                announced = holder
            await asyncio.sleep(self.retry_seconds)
        log.info("%s acquired by %s", self, self.identity)

    async def hold(self) -> NoReturn:
        """Renew the lease until it is lost, then raise LeadershipError. Cancelled, it leaves the lease to expire (as
        a SIGKILLed holder would) unless release() follows."""
        while True:
            await asyncio.sleep(self.retry_seconds)
            try:
                async with asyncio.timeout_at(self._renewed_at + self.renew_deadline_seconds):
                    while (holder := await self._round()) != self.identity:
                        if holder:
                            raise LeadershipError(f"{self} was taken over by {holder}")
                        await asyncio.sleep(self.retry_seconds)
            except TimeoutError:
                raise LeadershipError(f"{self} was not renewed for {self.renew_deadline_seconds:g}s") from None

    async def release(self) -> None:
        """Give the lease up if this replica holds it, so that a standby takes over at once."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._release)
        except API_FAILURES as exc:
            log.warning("%s not released, a standby takes over when it expires: %s", self, exc)

    async def _round(self) -> str | None:
        """One round of tryAcquireOrRenew: the holder it leaves, None when the API call failed."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            holder = await loop.run_in_executor(self._thread, self._acquire_or_renew)
        except ApiException as exc:
            # 409: another replica wrote the lease between our read and our write; the next round reads who.
            log.log(
                logging.DEBUG if is_status(exc, 409) else logging.WARNING, "%s: %s %s", self, exc.status, exc.reason
            )
            return None
        except (HTTPError, OSError) as exc:
            log.warning("%s: %s", self, exc)
            return None
        if holder == self.identity:
            self._renewed_at = began
        return holder

    def _acquire_or_renew(self) -> str:
        now = datetime.now(UTC)
        lease = self._read()
        if lease is None:
            manifest = {"apiVersion": LEASE[0], "kind": LEASE[1], "metadata": {"name": self.name}, "spec": {}}
            self._write("POST", Kube.path(LEASE, self.namespace), self._held(manifest, now, new_term=True))
            return self.identity
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder and holder != self.identity and not expired(spec, now):
            return holder
        self._write("PUT", self._path, self._held(lease, now, new_term=holder != self.identity))
        return self.identity

    def _held(self, lease: dict[str, Any], now: datetime, new_term: bool) -> dict[str, Any]:
        """`lease` as held by this replica from `now`. A new term (the lease was another's, or no one's) has its own
        acquire time and counts a transition; a renewal, or a restart under the same name, keeps both."""
        spec = lease["spec"] = dict(lease.get("spec") or {})
        if new_term:
            transitions = spec["leaseTransitions"] + 1 if "leaseTransitions" in spec else 0
            spec.update(acquireTime=micro_time(now), leaseTransitions=transitions)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=self.lease_seconds, renewTime=micro_time(now))
        return lease

    def _release(self) -> None:
        lease = self._read()
        spec = (lease or {}).get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return
        # As client-go releases: no holder, and a 1 s lease, so that even an older client takes it at once.
        now = micro_time(datetime.now(UTC))
        lease["spec"] = {
            **spec,
            "holderIdentity": None,
            "leaseDurationSeconds": 1,
            "acquireTime": now,
            "renewTime": now,
        }
        self._write("PUT", self._path, lease)
        log.info("%s released by %s", self, self.identity)

    @property
    def _path(self) -> str:
        return Kube.path(LEASE, self.namespace, self.name)

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.kube.request("GET", self._path, timeout=self.renew_deadline_seconds)
        except ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def _write(self, method: str, path: str, lease: dict[str, Any]) -> None:
        # A replace carries the resourceVersion it read: the API server refuses it (409) if the lease changed since.
        self.kube.request(method, path, lease, timeout=self.renew_deadline_seconds)


def replica_identity() -> str:
    """The pod's name: unique among live replicas, and unchanged when its container restarts (which resumes at once)."""
    return os.environ.get("POD_NAME") or socket.gethostname()


def lease_namespace() -> str:
    namespace = os.environ.get("POD_NAMESPACE")
    if not namespace:
        raise LeadershipError("leader election needs POD_NAMESPACE, the namespace of its Lease")
    return namespace


@contextlib.asynccontextmanager
async def standby_health(port: int) -> AsyncIterator[None]:
    """Answer /healthz while standing by, so that the kubelet keeps a standby alive; kopf's own endpoint takes the port
    over once the replica leads. aiohttp is kopf's HTTP library, as it serves its endpoint with it."""
    if not port:
        yield
        return

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"standby": True})

    app = aiohttp.web.Application()
    app.router.add_get("/healthz", healthz)
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, "0.0.0.0", port).start()
        yield
    finally:
        await runner.cleanup()


class Leadership:
    """The lease as the operator holds it: taken before kopf starts, renewed beside it by a task that stops the
    operator when the lease is lost, released once kopf stopped. Without leader election: nothing of that."""

    def __init__(self, elector: LeaseElector | None = None, holding: asyncio.Task | None = None):
        self._elector, self._holding = elector, holding

    @classmethod
    async def begin(cls, configuration: kubernetes.client.Configuration, settings: Settings) -> Leadership:
        """Return at once without leader election, else once this replica holds the lease."""
        if not settings.leader_election:
            return cls()
        elector = LeaseElector(
            # Connections of its own: a renewal never waits for one that a reconcile pass holds.
            Kube(configuration),
            lease_namespace(),
            settings.lease_name,
            replica_identity(),
            lease_seconds=settings.lease_seconds,
            renew_deadline_seconds=settings.lease_renew_deadline_seconds,
            retry_seconds=settings.lease_retry_seconds,
        )
        async with standby_health(settings.health_port):
            await elector.acquire()
        # Created before kopf starts, so that kopf's shutdown leaves it alone.
        holding = asyncio.create_task(elector.hold(), name="lease renewal")
        operator = asyncio.current_task()
        holding.add_done_callback(lambda _: cls._stop_when_lost(holding, operator))
        return cls(elector, holding)

    @staticmethod
    def _stop_when_lost(holding: asyncio.Task, operator: asyncio.Task) -> None:
        # Cancelling stops kopf as its stop flag would, without the flag's cost: after a SIGTERM, kopf gives the task
        # waiting for a never-set stop flag 5 s before it exits.
        if not holding.cancelled():
            log.error("%s: stopping the operator", holding.exception())
            operator.cancel()

    async def end(self) -> None:
        """Once kopf stopped: release the lease, or raise LeadershipError if it was lost."""
        if self._holding is None:
            return
        try:
            if self._holding.done():
                self._holding.result()
            self._holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._holding
            await self._elector.release()
        finally:
            self._elector.kube.close()
