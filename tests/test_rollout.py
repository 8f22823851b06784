"""speciesclf.rollout: sticky routing, the gates' statistics, the controller's verdicts, the deployment's
fallbacks and background comparisons, and the state in the registry (fast stand-in classifiers; the real
model is in test_rollout_real.py and the service's tests)."""

from __future__ import annotations

import json
import logging
import math
import random
import time

import pytest

from rollout_fakes import FakeClassifier, tiny_registry
from speciesclf import Predictor, PreprocessSpec
from speciesclf.errors import error_code, error_status
from speciesclf.rollout import (CandidateRefused, Deployment, GatePolicy, MemoryStore, RegistryStore, Rollout,
                                RolloutError, RolloutPolicy, RolloutSpecError, evaluate_gates, parse_rollout,
                                routing_hash)
from speciesclf.rollout.gates import log_likelihood_ratio


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _deployment(candidate=None, policy=None, clock=None, item_delay_s: float = 0.0, **kw) -> Deployment:
    rollout = Rollout(MemoryStore(), name="m", clock=clock or Clock())
    return Deployment(FakeClassifier("m@1.0.0", item_delay_s=item_delay_s), candidate, policy=policy, rollout=rollout,
                      sync_interval_s=None, **kw)


def _keys(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# --- routing ------------------------------------------------------------------------------------------------


def test_routing_hash_is_stable_and_uniform():
    assert routing_hash("user-1") == routing_hash(b"user-1")
    values = [routing_hash(f"key{i}") for i in range(20_000)]
    assert all(0 <= v < 1 for v in values)
    bins = [0] * 10
    for v in values:
        bins[int(v * 10)] += 1
    assert max(abs(b - 2000) for b in bins) < 200  # 4.5 sigma of a binomial(20000, 0.1)


def test_keys_never_move_back_as_the_weight_rises():
    d = _deployment(FakeClassifier("m@1.1.0"), parse_rollout("canary:5,25,50,100"))
    keys = _keys(2000)
    images = [f"img{i}".encode() for i in range(2000)]
    reached: set[str] = set()
    for weight in (0.05, 0.25, 0.5, 0.8, 1.0):
        d.rollout.set_weight(weight)
        predictions = d.predict_batch(images, routing_keys=keys)
        on_candidate = {k for k, p in zip(keys, predictions) if p.arm == "candidate"}
        assert reached <= on_candidate
        share = len(on_candidate) / len(keys)
        assert abs(share - weight) < 0.05
        reached = on_candidate
    assert len(reached) == len(keys)
    d.close()


def test_default_key_is_the_image_bytes():
    d = _deployment(FakeClassifier("m@1.1.0"), parse_rollout("canary:50,100"))
    images = [f"img{i}".encode() for i in range(200)]
    first = [p.arm for p in d.predict_batch(images)]
    again = [p.arm for p in d.predict_batch(list(reversed(images)))]
    assert first == list(reversed(again))
    assert {"primary", "candidate"} == set(first)
    d.close()


def test_every_prediction_names_its_version_and_arm():
    d = _deployment(FakeClassifier("m@1.1.0"), parse_rollout("canary:50,100"))
    for p in d.predict_batch([f"i{i}".encode() for i in range(100)]):
        assert (p.arm, p.model) in {("primary", "m@1.0.0"), ("candidate", "m@1.1.0")}
        assert p.to_dict()["arm"] == p.arm
    assert isinstance(d, Predictor)
    d.close()


# --- policies -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("", "a rollout spec is"),
    ("blue-green", "the mode is 'canary' or 'shadow'"),
    ("canary:5,x", "comma-separated percentages"),
    ("canary:50,25,100", "must increase"),
    ("canary:5,50", "last canary step must be 100"),
    ("canary:0,100", "percentages in (0, 100]"),
    ("shadow:2", "shadow_share"),
    ("shadow:abc", "a shadow share is a number"),
])
def test_bad_rollout_specs_say_what_is_wrong(text, message):
    with pytest.raises(RolloutSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rollout(text)


def test_rollout_specs_parse():
    assert parse_rollout("canary").steps == (5.0, 25.0, 50.0, 100.0)
    assert parse_rollout("canary:10,100").steps == (10.0, 100.0)
    shadow = parse_rollout("shadow:0.25")
    assert (shadow.mode, shadow.shadow_share) == ("shadow", 0.25)
    policy = parse_rollout("canary", min_requests=10)
    assert RolloutPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


@pytest.mark.parametrize("field, value", [("alpha", 0.0), ("alpha", 0.7), ("latency_factor", 0.5), ("latency_quantile", 0.3),
                                          ("min_agreement", 1.0), ("error_tolerance", 0.6), ("error_detect", 0.0),
                                          ("alpha", float("nan")), ("alpha", True)])
def test_bad_gate_thresholds_are_refused(field, value):
    with pytest.raises(RolloutSpecError, match=field):
        GatePolicy(**{field: value})


def test_rollout_errors_have_codes_in_the_one_table():
    assert (error_code(RolloutError("x")), error_status(RolloutError("x"))) == ("rollout_conflict", 409)
    assert error_code(CandidateRefused("x")) == "candidate_refused"
    assert (error_code(RolloutSpecError("x")), error_status(RolloutSpecError("x"))) == ("invalid_rollout", 422)


# --- the gates' statistics -------------------------------------------------------------------------------------------


def _trips(rate: float, p0: float, p1: float, alpha: float, horizon: int, rng: random.Random) -> int | None:
    """The event at which a one-sided SPRT first trips on a stream of Bernoulli(rate), or None."""
    up, down = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    llr, threshold = 0.0, math.log(1 / alpha)
    for n in range(1, horizon + 1):
        llr += up if rng.random() < rate else down
        if llr >= threshold:
            return n
    return None


def test_a_gate_trips_falsely_at_most_alpha_of_the_time_however_long_it_watches():
    rng = random.Random(7)
    alpha, runs = 0.02, 3000
    false = sum(_trips(0.05, 0.05, 0.15, alpha, 2000, rng) is not None for _ in range(runs))
    # Ville's bound: at most alpha (60 of 3000); allow binomial noise above it (3 sigma ~ 23).
    assert false <= alpha * runs + 3 * math.sqrt(alpha * runs)
    # A candidate better than the tolerance trips even more rarely.
    assert sum(_trips(0.02, 0.05, 0.15, alpha, 2000, rng) is not None for _ in range(runs)) <= 10


def test_default_gates_catch_the_issue_s_bad_candidates_within_300_requests():
    gates = GatePolicy()
    rng = random.Random(3)
    # 5% failing requests against a primary that never fails
    at = [_trips(0.05, gates.error_tolerance, gates.error_tolerance + gates.error_detect, gates.alpha, 300, rng)
          for _ in range(400)]
    assert sum(a is None for a in at) / len(at) < 0.05
    # agreement collapsing: ~all comparisons disagree (a sample of the requests is compared)
    p0 = 1 - gates.min_agreement
    assert _trips(0.95, p0, p0 + gates.agreement_detect, gates.alpha, 300, rng) < 30


def test_evaluate_gates_uses_the_primary_s_own_error_rate_as_baseline():
    counts = {"primary": {"requests": 1000, "errors": 100}, "gates": {"errors": [100, 12]}}
    errors = next(g for g in evaluate_gates(GatePolicy(), counts) if g.name == "errors")
    assert errors.p0 == pytest.approx(0.1 + GatePolicy().error_tolerance)
    assert not errors.tripped  # 12% against a primary failing 10% is within tolerance
    assert errors.llr == pytest.approx(log_likelihood_ratio(100, 12, errors.p0, errors.p1))
    accuracy = next(g for g in evaluate_gates(GatePolicy(), {"gates": {"accuracy": [50, 50]}}) if g.name == "accuracy")
    assert not accuracy.active and not accuracy.tripped  # no feedback on the primary yet: no baseline


# --- the controller ---------------------------------------------------------------------------------------------


def test_a_good_candidate_goes_through_every_step_and_is_promoted(caplog):
    caplog.set_level(logging.INFO, logger="speciesclf.rollout")
    clock = Clock()
    policy = parse_rollout("canary:10,50,100", min_requests=30, min_seconds=5, compare_share=0.5)
    # Calls of a few milliseconds, as a model's are: the latency gate compares them (microseconds are noise).
    d = _deployment(FakeClassifier("m@1.1.0", item_delay_s=0.001), policy, clock=clock, item_delay_s=0.001)
    weights = []
    for round_ in range(400):
        d.predict_batch([f"r{round_}-{i}".encode() for i in range(8)])
        d.drain()
        clock.t += 0.5
        d.sync()
        if d.rollout.state["phase"] != "running":
            break
        weights.append(d.rollout.weight)
    state = d.rollout.state
    assert state["phase"] == "promoted", state.get("reason")
    assert sorted(set(weights)) == [0.1, 0.5, 1.0] and weights == sorted(weights)
    assert d.model == "m@1.1.0" and d.candidate_model is None  # the candidate is the primary now
    verdicts = [r.fields["verdict"] for r in caplog.records if r.getMessage() == "rollout verdict"]
    assert verdicts == ["start", "advance", "advance", "promote"]
    assert d.rollout.verdicts() == {"start": 1, "advance": 2, "promote": 1}
    assert all(p.arm == "primary" and p.model == "m@1.1.0" for p in d.predict_batch([b"after"]))
    d.close()


def test_a_step_is_held_for_its_time_and_its_requests():
    clock = Clock()
    d = _deployment(FakeClassifier("m@1.1.0"), parse_rollout("canary:50,100", min_requests=10, min_seconds=60),
                    clock=clock)
    d.predict_batch([f"a{i}".encode() for i in range(200)])
    d.sync()
    assert d.rollout.state["step"] == 0  # enough requests, not enough time
    clock.t += 61
    d.sync()
    assert d.rollout.state["step"] == 1
    d.close()


def test_a_wrong_candidate_is_rolled_back_with_the_reason(caplog):
    caplog.set_level(logging.INFO, logger="speciesclf.rollout")
    d = _deployment(FakeClassifier("m@1.1.0", shift=3), parse_rollout("canary", compare_share=0.05))
    for round_ in range(100):
        d.predict_batch([f"w{round_}-{i}".encode() for i in range(16)])
        d.drain()
        d.sync()
        if d.rollout.state["phase"] != "running":
            break
    state = d.rollout.state
    assert state["phase"] == "rolled_back"
    assert "gate agreement tripped" in state["reason"]
    assert state["counts"]["candidate"]["requests"] < 300
    assert d.candidate_model is None
    assert all(p.arm == "primary" for p in d.predict_batch([f"x{i}".encode() for i in range(50)]))
    rollback = [r for r in caplog.records if getattr(r, "fields", {}).get("verdict") == "rollback"]
    assert len(rollback) == 1 and rollback[0].fields["gates"]["agreement"]["events"] > 0
    d.close()


def test_pause_resume_promote_by_a_person_and_wrong_phases():
    d = _deployment(FakeClassifier("m@1.1.0"), parse_rollout("canary"))
    with pytest.raises(RolloutError, match="is running"):
        d.rollout.start("1.0.0", "1.1.0", parse_rollout("canary"))
    d.rollout.pause("looking at it")
    assert d.rollout.state["phase"] == "paused" and d.rollout.state["reason"] == "looking at it"
    with pytest.raises(RolloutError, match="cannot pause"):
        d.rollout.pause()
    d.rollout.resume()
    d.rollout.promote()
    d.sync()
    assert d.rollout.state["phase"] == "promoted" and d.model == "m@1.1.0"
    with pytest.raises(RolloutError, match="cannot rollback"):
        d.rollout.rollback()
    with pytest.raises(RolloutSpecError):
        d.rollout.set_weight(1.5)
    d.close()


# --- the deployment ------------------------------------------------------------------------------------------


def test_a_failing_candidate_call_is_answered_by_the_primary():
    d = _deployment(FakeClassifier("m@1.1.0"), parse_rollout("canary:50,100"))
    d._candidate.classifier.fail = True  # noqa: SLF001 - fails after its warm-up
    predictions = d.predict_batch([f"f{i}".encode() for i in range(100)])
    assert all(p.ok and p.arm == "primary" for p in predictions)
    counts = d.rollout._pending  # noqa: SLF001 - before the sync
    assert counts["candidate"]["fallbacks"] == counts["candidate"]["errors"] > 20
    d.sync()
    assert d.rollout.state["phase"] == "rolled_back" and "gate errors" in d.rollout.state["reason"]
    d.close()


def test_a_model_error_on_the_candidate_falls_back_but_an_image_error_is_the_image_s():
    d = _deployment(FakeClassifier("m@1.1.0", nan_class0=True), parse_rollout("canary:100"))
    images = [f"n{i}".encode() for i in range(60)] + [b"corrupt"]
    predictions = d.predict_batch(images)
    assert all(p.ok for p in predictions[:-1])
    assert any(p.arm == "primary" for p in predictions[:-1])  # the NaN ones
    assert predictions[-1].error is not None and error_code(predictions[-1].error) == "decode_error"
    assert d.rollout._pending["candidate"]["fallbacks"] == sum(p.arm == "primary" for p in predictions[:-1])  # noqa: SLF001
    d.close()


def test_shadow_answers_from_the_primary_and_sheds_instead_of_waiting():
    slow = FakeClassifier("m@1.1.0", delay_s=0.3)
    d = _deployment(slow, parse_rollout("shadow", shadow_queue=8))
    start = time.perf_counter()
    predictions = []
    for i in range(40):
        predictions += d.predict_batch([f"s{i}-{j}".encode() for j in range(4)])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0  # 40 calls while the shadow candidate needs 0.3 s per call: never waited for
    assert all(p.arm == "primary" and p.model == "m@1.0.0" for p in predictions)
    assert d.local["shed"] > 0
    d.drain(5)
    d.sync()
    counts = d.rollout.state["counts"]
    assert counts["compare"]["shed"] == d.local["shed"]
    assert 0 < counts["compare"]["compared"] <= 160 - d.local["shed"]
    d.close()


def test_shadow_compares_on_the_same_images():
    d = _deployment(FakeClassifier("m@1.1.0", shift=1), parse_rollout("shadow", compare_budget=1.0))
    for i in range(10):
        d.predict_batch([f"c{i}-{j}".encode() for j in range(8)])
        d.drain()
    d.sync()
    state = d.rollout.state
    assert state["phase"] == "rolled_back" and "agreement" in state["reason"]
    d.close()


def test_a_candidate_with_another_contract_never_gets_traffic():
    primary = FakeClassifier("m@1.0.0")
    with pytest.raises(CandidateRefused, match="labels differ"):
        Deployment(primary, FakeClassifier("m@1.1.0", labels=[f"other{i}" for i in range(10)]),
                   policy=parse_rollout("canary"), sync_interval_s=None)
    with pytest.raises(CandidateRefused, match="reports 3 classes"):
        Deployment(primary, FakeClassifier("m@1.1.0", labels=["a", "b", "c"]), policy=parse_rollout("canary"),
                   sync_interval_s=None)
    with pytest.raises(CandidateRefused, match="preprocessing"):
        Deployment(primary, FakeClassifier("m@1.1.0", spec=PreprocessSpec(size=160)), policy=parse_rollout("canary"),
                   sync_interval_s=None)
    with pytest.raises(CandidateRefused, match="warm-up"):
        Deployment(primary, FakeClassifier("m@1.1.0", fail=True), policy=parse_rollout("canary"), sync_interval_s=None)


def test_retired_versions_close_once_no_call_holds_them():
    old = FakeClassifier("m@1.0.0")
    new = FakeClassifier("m@1.1.0")
    d = Deployment(old, new, policy=parse_rollout("canary:100"), sync_interval_s=None, own=True)
    d.rollout.promote()
    d.sync()
    assert old.closed and not new.closed
    d.close()
    assert new.closed


# --- the state in the registry ---------------------------------------------------------------------------------


def test_the_state_is_in_the_registry_and_a_restart_resumes_the_same_step(tmp_path):
    registry = tiny_registry(tmp_path)
    clock = Clock()
    rollout = Rollout(RegistryStore(registry, "m"), name="m", registry=registry, clock=clock)
    rollout.start("1.0.0", "1.1.0", parse_rollout("canary", min_requests=5, min_seconds=1))
    rollout.record_request("candidate", 10)
    clock.t += 2
    rollout.sync()
    assert rollout.state["step"] == 1
    on_disk = json.loads((registry.root / "m" / "rollout.json").read_text())
    assert on_disk["step"] == 1 and on_disk["counts"]["candidate"]["requests"] == 10
    again = Rollout(RegistryStore(registry, "m"), name="m", registry=registry, clock=clock)
    assert again.state["step"] == 1 and again.weight == 0.25
    again.rollback("bad")
    assert registry.rejections("m")["1.1.0"]["reason"] == "bad"
    assert registry.aliases("m") == {"production": "1.0.0"}


def test_counts_of_several_workers_add_up(tmp_path):
    registry = tiny_registry(tmp_path)
    workers = [Rollout(RegistryStore(registry, "m"), name="m", registry=registry) for _ in range(3)]
    workers[0].start("1.0.0", "1.1.0", parse_rollout("canary", min_requests=10_000))
    for w in workers:
        w.sync()  # each learns which rollout its counts belong to
    for i, w in enumerate(workers):
        w.record_request("candidate", 10 + i, errors=0)
        w.record_gate("agreement", 5, 0)
        w.sync()
    state = workers[0].sync()
    assert state["counts"]["candidate"]["requests"] == 33
    assert state["counts"]["gates"]["agreement"] == [15, 0]
    assert state["step_requests"] == 33


def test_promotion_moves_the_production_alias(tmp_path):
    registry = tiny_registry(tmp_path)
    rollout = Rollout(RegistryStore(registry, "m"), name="m", registry=registry)
    rollout.start("1.0.0", "1.1.0", parse_rollout("canary"))
    rollout.promote()
    assert rollout.state["phase"] == "promoted"
    assert registry.aliases("m")["production"] == "1.1.0"


def test_a_corrupt_state_file_is_a_clear_error(tmp_path):
    registry = tiny_registry(tmp_path)
    (registry.root / "m" / "rollout.json").write_text("{not json")
    with pytest.raises(Exception, match="corrupt rollout file"):
        Rollout(RegistryStore(registry, "m"), name="m", registry=registry)
