"""The control path of a Deployment against its own background thread and other processes: a candidate
just started is not dropped by a concurrent sync, a replaced rollout's old candidate gets no traffic,
close() waits for a candidate being loaded, a production alias that will not load blocks nothing, and a
rejected version cannot come back through an alias."""

from __future__ import annotations

import copy
import threading
import time

import pytest

from rollout_fakes import FakeClassifier, tiny_registry
from speciesclf.rollout import Deployment, MemoryStore, Rollout, RolloutError, parse_rollout


class SlowStore(MemoryStore):
    """A store that holds its lock while it writes, as the registry's does (flock + fsync)."""

    def update(self, change):
        with self._lock:
            time.sleep(0.03)
            self._state = change(copy.deepcopy(self._state))
            return copy.deepcopy(self._state)


def test_a_started_candidate_is_not_dropped_by_a_concurrent_sync():
    for trial in range(8):
        d = Deployment(FakeClassifier("m@1.0.0"), FakeClassifier("m@1.1.0"), policy=parse_rollout("canary"),
                       rollout=Rollout(SlowStore(), name="m"), sync_interval_s=0.001)
        try:
            d.rollout.rollback("an earlier rollout, finished")
            deadline = time.monotonic() + 5
            while d.candidate_model is not None and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.004 * trial)
            d.start_candidate(FakeClassifier("m@1.2.0"))
            time.sleep(0.1)
            assert d.rollout.state["phase"] == "running"
            assert d.candidate_model == "m@1.2.0", f"trial {trial}: the new candidate was dropped"
        finally:
            d.close()


def test_the_old_candidate_of_a_replaced_rollout_gets_no_traffic():
    store = MemoryStore()
    old = FakeClassifier("m@1.1.0")
    d = Deployment(FakeClassifier("m@1.0.0"), old, policy=parse_rollout("canary:50,100"),
                   rollout=Rollout(store, name="m"), sync_interval_s=None)
    Rollout(store, name="m").start("1.0.0", "1.2.0", parse_rollout("canary:50,100"), replace=True)  # elsewhere
    old.fail = True
    # Before this process syncs it still sees its own rollout: 1.1.0 fails, the primary answers.
    predictions = d.predict_batch([f"i{i}".encode() for i in range(200)])
    assert all(p.ok for p in predictions) and d.local["fallbacks"] > 0
    state = d.sync()
    assert state["candidate"] == "1.2.0" and state["phase"] == "running"
    assert state["counts"]["candidate"]["errors"] == 0  # 1.1.0's failures are not booked on 1.2.0
    assert d.candidate_model is None  # 1.1.0 is dropped; a registry-backed deployment then loads 1.2.0
    after = d.predict_batch([f"j{i}".encode() for i in range(200)])
    assert {p.arm for p in after} == {"primary"}
    d.close()


def test_shadow_counts_each_comparison_once_toward_the_step():
    d = Deployment(FakeClassifier("m@1.0.0"), FakeClassifier("m@1.1.0"),
                   policy=parse_rollout("shadow", compare_budget=1.0, min_requests=60, min_seconds=0,
                                        min_comparisons=0),
                   rollout=Rollout(MemoryStore(), name="m"), sync_interval_s=None)
    for i in range(5):
        d.predict_batch([f"s{i}-{j}".encode() for j in range(8)])
        d.drain()
    state = d.sync()
    assert state["step_requests"] == state["counts"]["compare"]["compared"] == 40
    assert state["phase"] == "running"  # 40 of the 60 asked for
    d.close()


def test_close_waits_for_a_candidate_being_loaded_and_closes_it(tmp_path):
    registry = tiny_registry(tmp_path)
    loading = threading.Event()
    made: list[FakeClassifier] = []

    def loader(ref):
        version = registry.resolve(ref).name
        if version == "1.1.0":
            loading.set()
            time.sleep(1.0)
        made.append(FakeClassifier(f"m@{version}"))
        return made[-1]

    d = Deployment.from_registry("m@production", registry=registry, loader=loader, watch_interval_s=0.05,
                                 sync_interval_s=0.05)
    registry.set_alias("m", "candidate", "1.1.0")
    assert loading.wait(10)
    d.close()
    assert not d._syncer.is_alive()  # noqa: SLF001
    assert all(c.closed for c in made), "a classifier loaded during close() was left open"


def test_a_production_alias_that_will_not_load_blocks_nothing(tmp_path, caplog):
    registry = tiny_registry(tmp_path, ("1.0.0", "1.1.0", "1.2.0"))
    loads: list[str] = []

    def loader(ref):
        version = registry.resolve(ref).name
        loads.append(version)
        if version == "1.2.0":
            raise OSError("corrupt model file")
        return FakeClassifier(f"m@{version}")

    d = Deployment.from_registry("m@production", registry=registry, loader=loader, watch_interval_s=None,
                                 sync_interval_s=None)
    registry.set_alias("m", "production", "1.2.0")
    registry.set_alias("m", "candidate", "1.1.0")
    for _ in range(3):
        d.refresh()
    assert loads.count("1.2.0") == 1  # refused once, not retried on every poll
    assert d.model == "m@1.0.0" and d.candidate_model == "m@1.1.0"
    assert any("reload refused" in r.getMessage() for r in caplog.records)
    d.close()


def test_a_rejected_version_cannot_come_back_through_an_alias(tmp_path):
    registry = tiny_registry(tmp_path)
    registry.reject("m", "1.1.0", "rolled back: gate errors tripped")
    registry.set_alias("m", "candidate", "1.1.0")
    d = Deployment.from_registry("m@production", registry=registry,
                                 loader=lambda ref: FakeClassifier(f"m@{registry.resolve(ref).name}"),
                                 watch_interval_s=None, sync_interval_s=None)
    try:
        assert d.candidate_model is None
        for ref in ("m@1.1.0", "m@candidate"):
            with pytest.raises(RolloutError, match="was rejected"):
                d.start_candidate(ref)
        d.start_candidate("m@candidate", force=True)
        assert d.candidate_model == "m@1.1.0" and "1.1.0" not in registry.rejections("m")
    finally:
        d.close()


def test_the_service_batches_each_arm_of_a_canary_apart():
    """Route, then batch: a batch holds the head request's arm (and requests of mixed arms), so each version
    runs whole batches; the head request always goes first."""
    import asyncio

    from speciesclf.serve.batcher import Batcher, _Job
    from speciesclf.serve.config import ServeConfig
    from speciesclf.serve.metrics import Metrics

    d = Deployment(FakeClassifier("m@1.0.0"), FakeClassifier("m@1.1.0"), policy=parse_rollout("canary:50,100"),
                   rollout=Rollout(MemoryStore(), name="m"), sync_interval_s=None)

    async def batches() -> list[list[str | None]]:
        batcher = Batcher(d, ServeConfig(max_batch_size=4), Metrics())
        batcher._wakeup = asyncio.Event()  # noqa: SLF001 - the worker is not started: batches are taken by hand
        loop = asyncio.get_running_loop()
        keys = [f"user-{i}" for i in range(12)]
        for key in keys:
            batcher._queue.append(_Job([b"img"], 1, loop.time() + 60, loop.create_future(),  # noqa: SLF001
                                       [key], d.arm_for(key)))
        mixed = [f"user-{i}" for i in (0, 1, 2, 3)]
        batcher._queue.append(_Job([b"a"] * 4, 1, loop.time() + 60, loop.create_future(), mixed, None))  # noqa: SLF001
        taken = []
        while batcher._queue:  # noqa: SLF001
            taken.append([job.arm for job, _, _ in await batcher._next_batch()])  # noqa: SLF001
        return taken, [d.arm_for(k) for k in keys]

    taken, arms = asyncio.run(batches())
    assert {"primary", "candidate"} <= set(arms)
    for batch in taken:
        assert len({arm for arm in batch if arm is not None}) <= 1, taken  # one arm per batch
    assert taken[0][0] == arms[0]  # the head went first
    assert sum(len(b) for b in taken) == 13
    d.close()
