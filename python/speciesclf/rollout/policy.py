"""What a rollout does: its mode, its steps and how long each is held, and the gates' thresholds.

Everything is validated when built, so that a policy that cannot work fails before any traffic moves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

__all__ = ["GatePolicy", "RolloutPolicy", "RolloutSpecError", "parse_rollout", "DEFAULT_STEPS"]

DEFAULT_STEPS = (5.0, 25.0, 50.0, 100.0)
MODES = ("canary", "shadow")


class RolloutSpecError(ValueError):
    """A rollout policy or spec string that cannot be used; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gates. Each gate turns a candidate request (or a paired comparison) into a yes/no
    event and runs a one-sided sequential probability ratio test of "the event rate is at most ``p0``"
    against "it is ``p1``"; it trips when the likelihood ratio reaches ``1/alpha``. By Ville's inequality a
    candidate no worse than ``p0`` trips a gate with probability at most ``alpha``, however long the rollout.

    The ``*_tolerance`` values are the ``p0`` of each gate over the primary's own rate where there is one;
    the ``*_detect`` values are how far above that ``p1`` sits: the breach the test is tuned to catch fast.
    """

    alpha: float = 0.001  # per gate; the false-rollback rate of a good candidate is at most (gates) * alpha
    # errors: the candidate failed on a request the primary then answered (not the image's own fault)
    error_tolerance: float = 0.005
    error_detect: float = 0.03
    # latency: a candidate call's time per image was over latency_factor x the primary's latency_quantile
    # (p90) in the same batch-size bucket. The primary's own calls pass its p90 10% of the time: that plus the
    # tolerance is what the candidate may do, and the factor leaves room for the small differences that
    # are no slowdown (where a call sits in its bucket, cache effects). A tail quantile, not the p99 itself:
    # the p99 of a few hundred calls is a handful of them, and a slowdown that moves the p99 moves the p90.
    latency_quantile: float = 0.9
    latency_factor: float = 1.5
    latency_tolerance: float = 0.05
    latency_detect: float = 0.20
    # agreement: on the same image, the candidate's top-1 (or "unknown") differs from the primary's
    min_agreement: float = 0.8
    agreement_detect: float = 0.15
    # unknown rate: on the same image the candidate says "unknown" where the primary named a class
    unknown_tolerance: float = 0.05
    unknown_detect: float = 0.10
    # confidence: on the same image the candidate's top-1 score is lower than the primary's by > confidence_drop
    confidence_drop: float = 0.1
    confidence_tolerance: float = 0.10
    confidence_detect: float = 0.15
    # accuracy from people's feedback labels: the candidate was wrong where it was judged (vs the primary's rate)
    accuracy_tolerance: float = 0.02
    accuracy_detect: float = 0.10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RolloutSpecError(f"GatePolicy.{f.name} must be a finite number, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        if not 0 < self.alpha < 0.5:
            raise RolloutSpecError(f"GatePolicy.alpha must be in (0, 0.5), got {self.alpha}")
        if self.latency_factor < 1:
            raise RolloutSpecError(f"GatePolicy.latency_factor must be >= 1, got {self.latency_factor}")
        if not 0.5 <= self.latency_quantile < 1 or (1 - self.latency_quantile) + self.latency_tolerance >= 0.5:
            raise RolloutSpecError(f"GatePolicy.latency_quantile must be in [0.5, 1) with 1 - latency_quantile + "
                                   f"latency_tolerance below 0.5, got {self.latency_quantile} and "
                                   f"{self.latency_tolerance}")
        if not 0 < self.min_agreement < 1:
            raise RolloutSpecError(f"GatePolicy.min_agreement must be in (0, 1), got {self.min_agreement}")
        if not 0 < self.confidence_drop < 1:
            raise RolloutSpecError(f"GatePolicy.confidence_drop must be in (0, 1), got {self.confidence_drop}")
        for name in ("error", "latency", "unknown", "confidence", "accuracy"):
            tol, detect = getattr(self, f"{name}_tolerance"), getattr(self, f"{name}_detect")
            if not 0 < tol < 0.5 or not 0 < detect < 0.5:
                raise RolloutSpecError(f"GatePolicy.{name}_tolerance ({tol}) and {name}_detect ({detect}) must be "
                                       "rates in (0, 0.5)")
        if not 0 < self.agreement_detect < self.min_agreement:
            raise RolloutSpecError(f"GatePolicy.agreement_detect must be in (0, min_agreement), got "
                                   f"{self.agreement_detect}")


@dataclasses.dataclass(frozen=True)
class RolloutPolicy:
    """How a candidate is brought in.

    ``canary``: the candidate answers ``steps[i]`` percent of the routing keys, step after step; each step
    is held for at least ``min_requests`` candidate requests and ``min_seconds``; after the last (100%) the
    candidate is promoted. A sample of the candidate's requests (``compare_share`` of all traffic at most)
    is also run on the primary, in the background, to compare the two on the same images.

    ``shadow``: the primary answers everything; ``shadow_share`` of the requests are copied to the
    candidate in the background and compared. A shadow rollout never promotes by itself: once every gate
    has seen ``min_requests`` comparisons without a breach it pauses, for a person to promote it or start a
    canary.

    ``on_breach``: "rollback" (weight to 0, the version marked rejected) or "pause" (hold for a person).
    ``hold_before_promote`` pauses before the promotion instead of promoting.
    """

    mode: Literal["canary", "shadow"] = "canary"
    steps: tuple[float, ...] = DEFAULT_STEPS
    min_requests: int = 200
    min_seconds: float = 30.0
    gates: GatePolicy = dataclasses.field(default_factory=GatePolicy)
    on_breach: Literal["rollback", "pause"] = "rollback"
    hold_before_promote: bool = False
    shadow_share: float = 1.0
    compare_share: float = 0.05
    # Comparisons on the same images needed before a promotion (or a shadow's pass): without them the
    # agreement, unknown and confidence gates would have seen too little to stop a wrong candidate.
    min_comparisons: int = 100
    shadow_queue: int = 64  # images waiting for the background comparison; beyond it they are shed
    # The share of wall time the comparison thread may be busy: it rests in between, so that copies of the
    # traffic take at most this share of a core from the primary (a slow candidate sheds more, not slows it).
    compare_budget: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RolloutSpecError(f"RolloutPolicy.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        try:
            steps = tuple(float(s) for s in self.steps)
        except (TypeError, ValueError):
            raise RolloutSpecError(f"RolloutPolicy.steps must be numbers (percent), got {self.steps!r}") from None
        if self.mode == "canary":
            if not steps:
                raise RolloutSpecError("a canary rollout needs at least one step")
            if any(not (0 < s <= 100) or not math.isfinite(s) for s in steps):
                raise RolloutSpecError(f"canary steps are percentages in (0, 100], got {list(steps)}")
            if any(b <= a for a, b in zip(steps, steps[1:])):
                raise RolloutSpecError(f"canary steps must increase, got {list(steps)}")
            if steps[-1] != 100:
                raise RolloutSpecError(f"the last canary step must be 100 (the candidate takes all traffic before "
                                       f"it is promoted), got {list(steps)}")
        object.__setattr__(self, "steps", steps)
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise RolloutSpecError(f"RolloutPolicy.min_requests must be an int >= 1, got {self.min_requests!r}")
        for name in ("min_seconds", "shadow_share", "compare_share", "compare_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise RolloutSpecError(f"RolloutPolicy.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0 < self.shadow_share <= 1 or self.compare_share > 1 or not 0 < self.compare_budget <= 1:
            raise RolloutSpecError("RolloutPolicy.shadow_share and compare_budget must be in (0, 1] and "
                                   "compare_share in [0, 1]")
        if isinstance(self.min_comparisons, bool) or not isinstance(self.min_comparisons, int) \
                or self.min_comparisons < 0:
            raise RolloutSpecError(f"RolloutPolicy.min_comparisons must be an int >= 0, got {self.min_comparisons!r}")
        if isinstance(self.shadow_queue, bool) or not isinstance(self.shadow_queue, int) or self.shadow_queue < 1:
            raise RolloutSpecError(f"RolloutPolicy.shadow_queue must be an int >= 1, got {self.shadow_queue!r}")
        if self.on_breach not in ("rollback", "pause"):
            raise RolloutSpecError(f"RolloutPolicy.on_breach must be 'rollback' or 'pause', got {self.on_breach!r}")
        if not isinstance(self.hold_before_promote, bool):
            raise RolloutSpecError("RolloutPolicy.hold_before_promote must be a bool")
        if not isinstance(self.gates, GatePolicy):
            raise RolloutSpecError(f"RolloutPolicy.gates must be a GatePolicy, got {type(self.gates).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["steps"] = list(self.steps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPolicy:
        try:
            fields = dict(data)
            fields["gates"] = GatePolicy(**fields.get("gates", {}))
            fields["steps"] = tuple(fields.get("steps", DEFAULT_STEPS))
            return cls(**fields)
        except TypeError as e:
            raise RolloutSpecError(f"not a rollout policy: {e}") from None


def parse_rollout(text: str, **overrides: Any) -> RolloutPolicy:
    """``"canary"`` (the default steps), ``"canary:5,25,50,100"``, ``"shadow"`` or ``"shadow:0.25"`` (the
    share of requests copied) into a :class:`RolloutPolicy`; ``overrides`` set its other fields."""
    if not isinstance(text, str) or not text.strip():
        raise RolloutSpecError(f"a rollout spec is 'canary[:STEP,...]' or 'shadow[:SHARE]', got {text!r}")
    mode, _, rest = text.strip().partition(":")
    mode = mode.strip().lower()
    if mode == "canary":
        if rest.strip():
            try:
                steps = tuple(float(part) for part in rest.split(","))
            except ValueError:
                raise RolloutSpecError(f"{text!r}: canary steps are comma-separated percentages, e.g. "
                                       "canary:5,25,50,100") from None
        else:
            steps = DEFAULT_STEPS
        return RolloutPolicy(mode="canary", steps=steps, **overrides)
    if mode == "shadow":
        share = 1.0
        if rest.strip():
            try:
                share = float(rest)
            except ValueError:
                raise RolloutSpecError(f"{text!r}: a shadow share is a number in (0, 1], e.g. shadow:0.25") from None
        return RolloutPolicy(mode="shadow", steps=(), shadow_share=share, **overrides)
    raise RolloutSpecError(f"{text!r}: the mode is 'canary' or 'shadow', e.g. canary:5,25,50,100 or shadow")
