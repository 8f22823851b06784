"""A Deployment kept in step with a registry, on the real model under several versions: a candidate alias
starts a rollout, a wrong candidate is rolled back and rejected, a good one promoted, a corrupt one refused,
and a moved production alias hot-reloaded."""

from __future__ import annotations

import itertools

import pytest

from rollout_bundles import GOOD, PRIMARY, SHUFFLED, make_registry
from speciesclf.rollout import Deployment, RolloutError, parse_rollout

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def photos(sample_photos):
    return [p.read_bytes() for p in sample_photos[:120]]


@pytest.fixture()
def registry(home, tmp_path):
    return make_registry(tmp_path / "registry", (PRIMARY, GOOD, SHUFFLED, "1.3.0"))


def _feed(deployment: Deployment, photos: list[bytes], rounds: int = 60) -> dict:
    images = itertools.cycle(photos)
    for _ in range(rounds):
        predictions = deployment.predict_batch([next(images) for _ in range(8)])
        assert all(p.ok for p in predictions), [p.error for p in predictions if not p.ok]
        deployment.drain()
        state = deployment.sync()
        if state["phase"] not in ("running", "paused"):
            break
    return deployment.rollout.state


def test_the_registry_drives_the_deployment(registry, photos):
    policy = parse_rollout("canary:50,100", min_requests=20, min_seconds=0, compare_share=0.5)
    d = Deployment.from_registry("species100@production", registry=registry, policy=policy,
                                 watch_interval_s=None, sync_interval_s=None)
    try:
        assert d.model == f"species100@{PRIMARY}" and d.candidate_model is None
        # A wrong candidate: its labels point at other outputs. Started by the alias, rolled back by the gates.
        registry.set_alias("species100", "candidate", SHUFFLED)
        d.refresh()
        assert d.candidate_model == f"species100@{SHUFFLED}"
        state = _feed(d, photos)
        assert state["phase"] == "rolled_back", state.get("reason")
        assert "agreement" in state["reason"]
        assert SHUFFLED in registry.rejections("species100")
        assert d.candidate_model is None
        d.refresh()  # a rejected version is not started again
        assert d.rollout.state["phase"] == "rolled_back"
        with pytest.raises(RolloutError, match="was rejected"):
            d.start_candidate(f"species100@{SHUFFLED}")

        # A corrupt version: refused with the reason, the primary keeps answering.
        model_file = next((registry.root / "species100" / "versions" / "1.3.0").glob("*.onnx"))
        model_file.write_bytes(b"\0" * 64)
        registry.set_alias("species100", "candidate", "1.3.0")
        d.refresh()
        assert d.candidate_model is None
        assert d.refused["version"].endswith("1.3.0") and "sha256" in d.refused["reason"]
        assert all(p.ok and p.arm == "primary" for p in d.predict_batch(photos[:4]))

        # A good candidate goes through the steps and is promoted: the production alias moves.
        registry.set_alias("species100", "candidate", GOOD)
        d.refresh()
        state = _feed(d, photos)
        assert state["phase"] == "promoted", state.get("reason")
        assert registry.aliases("species100")["production"] == GOOD
        assert d.model == f"species100@{GOOD}"
    finally:
        d.close()


def test_moving_production_by_hand_is_a_hot_reload(registry, photos):
    d = Deployment.from_registry("species100@production", registry=registry, watch_interval_s=None,
                                 sync_interval_s=None)
    try:
        before = d.predict_batch(photos[:6])
        registry.set_alias("species100", "production", GOOD)
        d.refresh()
        after = d.predict_batch(photos[:6])
        assert {p.model for p in before} == {f"species100@{PRIMARY}"}
        assert {p.model for p in after} == {f"species100@{GOOD}"}
        assert [p.label for p in before] == [p.label for p in after]  # the same weights
    finally:
        d.close()


def test_a_restarted_deployment_resumes_the_running_candidate(registry, photos):
    policy = parse_rollout("canary:5,25,50,100", min_requests=10_000)
    first = Deployment.from_registry("species100@production", registry=registry, candidate=f"species100@{GOOD}",
                                     policy=policy, watch_interval_s=None, sync_interval_s=None)
    first.rollout.set_weight(0.25)
    first.close()
    again = Deployment.from_registry("species100@production", registry=registry, watch_interval_s=None,
                                     sync_interval_s=None)
    try:
        assert again.candidate_model == f"species100@{GOOD}"
        assert again.rollout.weight == 0.25 and again.rollout.state["step"] == 1
        arms = {p.arm for p in again.predict_batch(photos[:40])}
        assert arms == {"primary", "candidate"}
    finally:
        again.close()


def test_two_workers_on_one_registry_run_one_rollout_and_route_alike(registry, photos):
    policy = parse_rollout("canary:50,100", min_requests=10_000)
    workers = [Deployment.from_registry("species100@production", registry=registry, policy=policy,
                                        watch_interval_s=None, sync_interval_s=None) for _ in range(2)]
    try:
        registry.set_alias("species100", "candidate", GOOD)
        for w in workers:
            w.refresh()
        history = registry.read_document("species100", "rollout")["history"]
        assert [h["verdict"] for h in history] == ["start"]  # started once, joined by the other
        keys = [f"user-{i}" for i in range(60)]
        arms = [[p.arm for p in w.predict_batch(photos[:60], routing_keys=keys)] for w in workers]
        assert arms[0] == arms[1] and set(arms[0]) == {"primary", "candidate"}
        for w in workers:
            w.sync()
        counts = registry.read_document("species100", "rollout")["counts"]
        assert counts["candidate"]["requests"] == 2 * arms[0].count("candidate")
        workers[1].rollout.rollback("a person")
        for w in workers:
            w.sync()
        assert workers[0].candidate_model is None and workers[1].candidate_model is None
    finally:
        for w in workers:
            w.close()
