"""The rollout controller: counts what the deployment saw, runs the gates, and moves the rollout on.

Every process that serves the rollout records into its own pending counts; :meth:`Rollout.sync` adds them
to the shared state and decides, in one locked read-modify-write of the store, so that the workers of a
service decide on the same numbers and never twice. Verdicts:

- ``advance``: the step was held long enough with no gate tripped; the weight moves to the next step;
- ``promote``: after the last step, the registry alias ``production`` moves to the candidate's version;
- ``rollback``: a gate tripped; the weight goes to 0 and the version is marked rejected, with the reason;
- ``pause``: hold for a person (a gate tripped under ``on_breach="pause"``, a shadow rollout that passed,
  ``hold_before_promote``, or a person's request); ``resume`` goes on from the same step;
- ``abort``: the rollout ended without a judgement of the candidate (its alias was removed, a person
  started another, or the primary changed under it).

Each verdict is one JSON log line (logger ``speciesclf.rollout``) and is counted in :meth:`Rollout.verdicts`.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .gates import GATES, evaluate_gates
from .policy import RolloutPolicy, RolloutSpecError
from .state import ACTIVE_PHASES, HISTORY_MAX, RolloutStore, empty_counts, merge_counts

__all__ = ["Rollout", "RolloutError", "VERDICTS"]

VERDICTS = ("start", "advance", "promote", "rollback", "pause", "resume", "abort", "weight")
logger = logging.getLogger("speciesclf.rollout")
# Called at named points of a promotion or rollback, for the crash tests only (see tests/test_rollout_crash.py).
_fault_points: dict[str, Callable[[], None]] = {}


class RolloutError(RuntimeError):
    """A rollout operation that cannot be done now (no rollout, another one running, a wrong phase...)."""


def _fault(point: str) -> None:
    hook = _fault_points.get(point)
    if hook is not None:
        hook()


class Rollout:
    """The rollout of ``name`` kept in ``store``. ``registry`` (optional) is where ``promote`` moves the
    ``production`` alias and ``rollback`` marks the version rejected; without one they change the state only.
    ``clock`` (wall seconds) is injectable for simulations."""

    def __init__(self, store: RolloutStore, *, name: str, registry: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.name = name
        self.registry = registry
        self.clock = clock
        self._lock = threading.Lock()
        self._pending = empty_counts()
        self._pending_step = 0
        self._pending_for: tuple | None = None  # the rollout the pending counts belong to
        self._verdicts: collections.Counter[str] = collections.Counter()  # decided by this process
        self.state: dict | None = store.read()

    # --- what the deployment saw (thread-safe, cheap: no I/O) ---------------------------------------

    def record_request(self, arm: str, n: int = 1, errors: int = 0) -> None:
        with self._lock:
            counts = self._pending[arm]
            counts["requests"] += n
            counts["errors"] += errors
            if arm == "candidate":
                self._pending_step += n

    def record_fallback(self, n: int = 1) -> None:
        with self._lock:
            self._pending["candidate"]["fallbacks"] += n

    def record_gate(self, gate: str, n: int, events: int) -> None:
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; one of {', '.join(GATES)}")
        with self._lock:
            tally = self._pending["gates"].setdefault(gate, [0, 0])
            tally[0] += n
            tally[1] += events

    def record_compare(self, compared: int = 0, shed: int = 0, failed: int = 0) -> None:
        with self._lock:
            counts = self._pending["compare"]
            counts["compared"] += compared
            counts["shed"] += shed
            counts["failed"] += failed

    def record_feedback(self, arm: str, correct: bool) -> None:
        """A person's label for a prediction the ``arm`` made: the input of the accuracy gate (the capture
        issue's feedback joins labels to predictions and calls this)."""
        if arm not in ("primary", "candidate"):
            raise ValueError(f"arm must be 'primary' or 'candidate', got {arm!r}")
        with self._lock:
            counts = self._pending[arm]
            counts["feedback"] += 1
            counts["feedback_wrong"] += 0 if correct else 1
            if arm == "candidate":
                tally = self._pending["gates"].setdefault("accuracy", [0, 0])
                tally[0] += 1
                tally[1] += 0 if correct else 1

    def _take_pending(self) -> tuple[dict, int, tuple | None]:
        with self._lock:
            pending, step, owner = self._pending, self._pending_step, self._pending_for
            self._pending, self._pending_step = empty_counts(), 0
            return pending, step, owner

    # --- reading -----------------------------------------------------------------------------------

    @property
    def weight(self) -> float:
        state = self.state
        if state is None or state.get("phase") not in ACTIVE_PHASES:
            return 0.0
        return float(state.get("weight", 0.0))

    @property
    def mode(self) -> str | None:
        state = self.state
        return None if state is None else state["policy"]["mode"]

    @property
    def active(self) -> bool:
        return self.state is not None and self.state.get("phase") in ACTIVE_PHASES

    def policy(self) -> RolloutPolicy | None:
        return None if self.state is None else RolloutPolicy.from_dict(self.state["policy"])

    def verdicts(self) -> dict[str, int]:
        """Verdicts this process decided (a metric: summed over workers, each verdict counts once)."""
        return dict(self._verdicts)

    def status(self) -> dict | None:
        """The state with the gates' current values (``gates``), as :meth:`sync` last saw it."""
        state = copy.deepcopy(self.state)
        if state is None:
            return None
        policy = RolloutPolicy.from_dict(state["policy"])
        state["gates"] = {g.name: g.to_dict() for g in evaluate_gates(policy.gates, state["counts"])}
        return state

    # --- deciding ----------------------------------------------------------------------------------

    def sync(self, now: float | None = None) -> dict | None:
        """Add this process's counts to the shared state, run the gates and act on their verdict."""
        now = self.clock() if now is None else now
        pending, step_requests, owner = self._take_pending()
        made: list[dict] = []

        def change(state: dict | None) -> dict | None:
            made.clear()
            if state is None:
                return None
            if owner is not None and owner == _identity(state) and state["phase"] in ACTIVE_PHASES:
                merge_counts(state["counts"], pending)
                state["step_requests"] = state.get("step_requests", 0) + step_requests
            if state["phase"] == "running":
                decision = _decide(state, now)
                if decision is not None:
                    made.append(_apply(state, decision[0], decision[1], now))
            return state

        return self._commit(change, made)

    def _commit(self, change: Callable[[dict | None], dict | None], made: list[dict]) -> dict | None:
        """Write ``change`` to the store, then announce the verdicts it made and finish their side effects."""
        state = self.store.update(change)
        self._adopt(state)
        for entry in made:
            self._announce(entry)
        self.recover()
        return self.state

    def _adopt(self, state: dict | None) -> None:
        self.state = state
        with self._lock:
            self._pending_for = None if state is None or state.get("phase") not in ACTIVE_PHASES else _identity(state)

    def _announce(self, entry: dict) -> None:
        self._verdicts[entry["verdict"]] += 1
        logger.info("rollout verdict", extra={"fields": {"rollout": self.name, **entry}})

    def recover(self) -> None:
        """Finish what a verdict left to do outside the state (the alias of a promotion, the rejection mark
        of a rollback), after a crash too: both are idempotent."""
        state = self.state
        if state is None:
            return
        if state["phase"] == "promoting":
            if self.registry is not None:
                _fault("before-alias")
                self.registry.set_alias(self.name, "production", state["candidate"])
                _fault("after-alias")

            def finish(current: dict | None) -> dict | None:
                if current is not None and current["phase"] == "promoting" and _identity(current) == _identity(state):
                    current["phase"] = "promoted"
                    current["finished_at"] = self.clock()
                return current

            self._adopt(self.store.update(finish))
        elif state["phase"] == "rolled_back" and self.registry is not None:
            if state["candidate"] not in self.registry.rejections(self.name):
                self.registry.reject(self.name, state["candidate"], state.get("reason") or "rolled back")

    # --- what people (and the service's watcher) do -----------------------------------------------------

    def start(self, primary: str, candidate: str, policy: RolloutPolicy, *, replace: bool = False,
              join: bool = False) -> dict:
        """Begin a rollout of ``candidate`` beside ``primary`` (versions of ``name``) at its first step.

        ``replace`` aborts a rollout of another candidate first. ``join`` leaves a rollout of the same
        candidate as it is (the workers of a service that all saw the same alias move start it once)."""
        if not isinstance(policy, RolloutPolicy):
            raise RolloutSpecError(f"policy must be a RolloutPolicy, got {type(policy).__name__}")
        if primary == candidate:
            raise RolloutError(f"{self.name}@{candidate} is already the primary")
        now = self.clock()
        made: list[dict] = []

        def change(state: dict | None) -> dict:
            made.clear()
            history = [] if state is None else list(state.get("history", []))
            if state is not None and state["phase"] == "promoting":
                raise RolloutError(f"the promotion of {self.name}@{state['candidate']} is not finished yet")
            if join and state is not None and state["candidate"] == candidate and state["primary"] == primary:
                if state["phase"] in ACTIVE_PHASES:
                    return state
                if state["phase"] in ("rolled_back", "promoting", "promoted"):
                    # Judged while this process was loading it (another worker): not started again.
                    raise RolloutError(f"the rollout of {self.name}@{candidate} already ended: {state['phase']}")
            if state is not None and state["phase"] in ACTIVE_PHASES:
                if not replace:
                    raise RolloutError(f"a rollout of {self.name}@{state['candidate']} is {state['phase']}; "
                                       "roll it back, promote it or abort it first")
                made.append(_apply(state, "abort", f"replaced by a rollout of {candidate}", now))
                history = list(state["history"])
            new = {
                "name": self.name, "primary": primary, "candidate": candidate, "policy": policy.to_dict(),
                "phase": "running", "step": 0, "weight": (policy.steps[0] / 100 if policy.mode == "canary" else 0.0),
                "started_at": now, "step_started_at": now, "step_requests": 0, "counts": empty_counts(),
                "history": history, "reason": None, "revision": 0 if state is None else state.get("revision", 0),
            }
            made.append(_apply(new, "start", f"{policy.mode} of {candidate} beside {primary}", now))
            return new

        return self._commit(change, made)

    def _act(self, verdict: str, reason: str, allowed: tuple[str, ...], edit: Callable[[dict], None] | None = None
             ) -> dict:
        now = self.clock()
        made: list[dict] = []

        def change(state: dict | None) -> dict | None:
            made.clear()
            if state is None:
                raise RolloutError(f"no rollout of {self.name}")
            if state["phase"] not in allowed:
                raise RolloutError(f"cannot {verdict} the rollout of {self.name}@{state['candidate']}: it is "
                                   f"{state['phase']}")
            if edit is not None:
                edit(state)
            made.append(_apply(state, verdict, reason, now))
            return state

        return self._commit(change, made)

    def pause(self, reason: str = "paused by a person") -> dict:
        return self._act("pause", reason, ("running",))

    def resume(self, reason: str = "resumed by a person") -> dict:
        return self._act("resume", reason, ("paused",))

    def promote(self, reason: str = "promoted by a person") -> dict:
        return self._act("promote", reason, ACTIVE_PHASES)

    def rollback(self, reason: str = "rolled back by a person") -> dict:
        return self._act("rollback", reason, ACTIVE_PHASES)

    def abort(self, reason: str) -> dict:
        return self._act("abort", reason, ACTIVE_PHASES)

    def set_weight(self, weight: float, reason: str = "set by a person") -> dict:
        """Send ``weight`` (0..1) of the routing keys to the candidate of a canary; the steps go on from the
        first one at or above it."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise RolloutSpecError(f"a weight is a number in [0, 1], got {weight!r}")

        def edit(state: dict) -> None:
            if state["policy"]["mode"] != "canary":
                raise RolloutError("a shadow rollout sends no traffic to its candidate: start a canary to set a weight")
            steps = state["policy"]["steps"]
            state["weight"] = float(weight)
            state["step"] = next((i for i, s in enumerate(steps) if s / 100 >= weight), len(steps) - 1)
            state["step_started_at"] = self.clock()
            state["step_requests"] = 0

        return self._act("weight", f"{reason}: {weight:g}", ACTIVE_PHASES, edit)


def _identity(state: dict) -> tuple:
    return (state.get("candidate"), state.get("started_at"))


def _decide(state: dict, now: float) -> tuple[str, str] | None:
    """The verdict a running rollout has earned now, or None to go on."""
    policy = RolloutPolicy.from_dict(state["policy"])
    tripped = [g for g in evaluate_gates(policy.gates, state["counts"]) if g.tripped]
    if tripped:
        reason = "; ".join(f"gate {g.name} tripped: {g.events} of {g.n} ({g.rate:.1%}) where at most {g.p0:.1%} "
                           f"is allowed ({GATES[g.name]})" for g in tripped)
        return (policy.on_breach, reason)
    held = now - state["step_started_at"] >= policy.min_seconds
    if not held or state.get("step_requests", 0) < policy.min_requests:
        return None
    last = policy.mode == "shadow" or state["step"] + 1 >= len(policy.steps)
    if last and state["counts"]["compare"]["compared"] < policy.min_comparisons:
        return None  # held until the comparisons can vouch for the candidate
    if policy.mode == "shadow":
        return ("pause", f"shadow passed: {state['counts']['compare']['compared']} comparisons, no gate tripped; "
                         "promote it or start a canary")
    if state["step"] + 1 < len(policy.steps):
        return ("advance", f"step {state['step'] + 1} held {now - state['step_started_at']:.0f} s and "
                           f"{state['step_requests']} candidate requests with no gate tripped")
    if policy.hold_before_promote:
        return ("pause", "every step passed; held for a person to promote (hold_before_promote)")
    return ("promote", f"every step passed ({', '.join(f'{s:g}%' for s in policy.steps)}) with no gate tripped")


def _apply(state: dict, verdict: str, reason: str, now: float) -> dict:
    """Change ``state`` as ``verdict`` says; returns its history entry (also appended to the state)."""
    policy = state["policy"]
    if verdict == "advance":
        state["step"] += 1
        state["weight"] = policy["steps"][state["step"]] / 100
        state["step_started_at"] = now
        state["step_requests"] = 0
    elif verdict == "promote":
        state["phase"] = "promoting"
        state["weight"] = 1.0
    elif verdict == "rollback":
        state["phase"] = "rolled_back"
        state["weight"] = 0.0
        state["finished_at"] = now
    elif verdict == "pause":
        state["phase"] = "paused"
    elif verdict == "resume":
        state["phase"] = "running"
        state["step_started_at"] = now
        state["step_requests"] = 0
    elif verdict == "abort":
        state["phase"] = "aborted"
        state["weight"] = 0.0
        state["finished_at"] = now
    if verdict in ("rollback", "pause", "abort", "promote"):
        state["reason"] = reason
    state["revision"] = state.get("revision", 0) + 1
    gates = {g.name: g.to_dict() for g in evaluate_gates(RolloutPolicy.from_dict(policy).gates, state["counts"])}
    entry = {"verdict": verdict, "at": now, "candidate": state["candidate"], "primary": state["primary"],
             "step": state["step"], "weight": state["weight"], "reason": reason,
             "candidate_requests": state["counts"]["candidate"]["requests"],
             "gates": {name: {"n": g["n"], "events": g["events"], "llr": g["llr"]} for name, g in gates.items() if g["n"]}}
    state["history"] = (state.get("history", []) + [entry])[-HISTORY_MAX:]
    return entry
