"""The work queue's guarantees: one wait per key, one worker per key, the earliest requeue wins, deferred halves last."""

import asyncio

import pytest

from finetune_operator import workqueue
from finetune_operator.workqueue import WorkQueue


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_key_added_many_times_waits_once():
    async def scenario():
        queue = WorkQueue()
        for key in ["a", "b", "a", "a", "b"]:
            queue.add(key)
        return len(queue), [await queue.get(), await queue.get()]

    assert run(scenario()) == (2, ["a", "b"])


def test_a_key_added_while_processed_is_handed_out_again_after_done_never_twice_at_once():
    async def scenario():
        queue = WorkQueue()
        queue.add("a")
        held = await queue.get()
        queue.add("a")
        queue.add("a")
        blocked = len(queue)
        queue.done(held)
        again = await asyncio.wait_for(queue.get(), 1)
        return blocked, again, len(queue)

    assert run(scenario()) == (0, "a", 0)


def test_the_earliest_requeue_wins_and_an_add_replaces_a_pending_one():
    async def scenario():
        loop = asyncio.get_running_loop()
        queue = WorkQueue()
        start = loop.time()
        queue.add_after("a", 5)
        queue.add_after("a", 0.05)  # sooner: replaces the 5 s timer
        queue.add_after("a", 3)  # later: ignored
        await asyncio.wait_for(queue.get(), 1)
        early = loop.time() - start
        queue.done("a")
        queue.add_after("b", 0.05)
        queue.add("b")  # now: the timer is dropped, so "b" is not queued a second time later
        await queue.get()
        queue.done("b")
        await asyncio.sleep(0.1)
        return early, len(queue)

    early, left = run(scenario())
    assert early < 1 and left == 0


def test_waiting_workers_each_get_a_different_key():
    async def scenario():
        queue = WorkQueue()
        getters = [asyncio.ensure_future(queue.get()) for _ in range(3)]
        await asyncio.sleep(0)
        for key in "xyz":
            queue.add(key)
        return sorted(await asyncio.gather(*getters))

    assert run(scenario()) == ["x", "y", "z"]


def test_a_cancelled_waiter_passes_its_wakeup_on():
    async def scenario():
        queue = WorkQueue()
        first = asyncio.ensure_future(queue.get())
        second = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        queue.add("a")  # wakes the first waiter...
        first.cancel()  # ...which is cancelled before it runs
        got = await asyncio.wait_for(second, 1)
        return first.cancelled(), got

    assert run(scenario()) == (True, "a")


def test_forget_drops_a_pending_requeue():
    async def scenario():
        queue = WorkQueue()
        queue.add_after("gone", 0.05)
        queue.forget("gone")
        await asyncio.sleep(0.1)
        return len(queue)

    assert run(scenario()) == 0


def test_a_deferred_key_goes_after_the_keys_waiting_and_stays_held():
    async def scenario():
        queue = WorkQueue()
        queue.add("a")
        held = await queue.get()
        for key in ("b", "c"):
            queue.add(key)
        queue.defer(held)
        queue.add("a")  # an event for the held job: handed out after its deferred half is done, never beside it
        order = [await queue.get() for _ in range(3)]
        empty = len(queue)
        queue.done("a")
        again = await asyncio.wait_for(queue.get(), 1)
        return order, empty, again

    assert run(scenario()) == (["b", "c", "a"], 0, "a")


def test_a_deferred_key_waits_for_new_keys_only_so_long(monkeypatch):
    monkeypatch.setattr(workqueue, "DEFER_MAX_SECONDS", 0.05)

    async def scenario():
        queue = WorkQueue()
        queue.add("old")
        queue.defer(await queue.get())
        await asyncio.sleep(0.1)
        queue.add("new")
        return [await queue.get(), await queue.get()]

    assert run(scenario()) == ["old", "new"]


def test_only_a_held_key_can_be_deferred():
    async def scenario():
        queue = WorkQueue()
        queue.add("a")
        with pytest.raises(ValueError, match="not held"):
            queue.defer("a")

    run(scenario())
