"""The gates: sequential tests that compare a candidate with the primary while traffic moves.

Every gate sees a stream of yes/no events (a candidate request failed; a comparison disagreed; ...) and
keeps only two counts, so that the workers of one service can add theirs up in one shared state. The
test is Wald's one-sided sequential probability ratio test of H0 "rate <= p0" against H1 "rate = p1":

    llr = events * ln(p1 / p0) + (n - events) * ln((1 - p1) / (1 - p0))

and the gate trips once ``llr >= ln(1 / alpha)``. Under H0 the likelihood ratio is a non-negative
(super)martingale, so by Ville's inequality it ever reaches ``1/alpha`` with probability at most ``alpha``:
the test may look after every request, and a breach is acted on as soon as it is clear, with a bounded
false-trip rate however long it runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .policy import GatePolicy

__all__ = ["GATES", "GateResult", "evaluate_gates", "log_likelihood_ratio"]

#: name -> what one event is
GATES = {
    "errors": "the candidate failed on a request (the primary answered it)",
    "latency": "a candidate call took longer than latency_factor x the primary's latency_quantile (p90) at its "
               "batch size",
    "agreement": "on the same image, named by either version, the candidate's top-1 (or 'unknown') differs from "
                 "the primary's",
    "unknown": "on the same image, the candidate says unknown where the primary named a class",
    "confidence": "on the same image, the candidate's top-1 score is below the primary's by more than confidence_drop",
    "accuracy": "a person's label says the candidate was wrong",
}
# Below this many reference observations of the primary, a rate gate has no baseline to compare with.
MIN_REFERENCE = 20


@dataclasses.dataclass(frozen=True)
class GateResult:
    name: str
    n: int  # events seen
    events: int
    p0: float
    p1: float
    llr: float
    threshold: float
    active: bool  # False while the gate has no baseline yet (accuracy without the primary's feedback)

    @property
    def tripped(self) -> bool:
        return self.active and self.llr >= self.threshold

    @property
    def rate(self) -> float | None:
        return self.events / self.n if self.n else None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "events": self.events, "rate": self.rate, "p0": round(self.p0, 6),
                "p1": round(self.p1, 6), "llr": round(self.llr, 4), "threshold": round(self.threshold, 4),
                "active": self.active, "tripped": self.tripped}


def log_likelihood_ratio(n: int, events: int, p0: float, p1: float) -> float:
    return events * math.log(p1 / p0) + (n - events) * math.log((1 - p1) / (1 - p0))


def _rate(counts: dict, numerator: str, denominator: str) -> tuple[float, int]:
    n = int(counts.get(denominator, 0))
    return (int(counts.get(numerator, 0)) / n if n else 0.0), n


def evaluate_gates(gates: GatePolicy, counts: dict) -> list[GateResult]:
    """The gates of a rollout's ``counts`` (see :class:`~speciesclf.rollout.state.RolloutState`)."""
    threshold = math.log(1 / gates.alpha)
    tallies = counts.get("gates", {})
    primary = counts.get("primary", {})
    primary_errors, _ = _rate(primary, "errors", "requests")
    primary_wrong, primary_judged = _rate(primary, "feedback_wrong", "feedback")
    bases = {
        # The primary's own rates are the baseline where there is one: a candidate is held to "no worse".
        "errors": (min(primary_errors + gates.error_tolerance, 0.5), gates.error_detect, True),
        "latency": ((1 - gates.latency_quantile) + gates.latency_tolerance, gates.latency_detect, True),
        "agreement": (1 - gates.min_agreement, gates.agreement_detect, True),
        "unknown": (gates.unknown_tolerance, gates.unknown_detect, True),
        "confidence": (gates.confidence_tolerance, gates.confidence_detect, True),
        "accuracy": (min(primary_wrong + gates.accuracy_tolerance, 0.5), gates.accuracy_detect,
                     primary_judged >= MIN_REFERENCE),
    }
    results = []
    for name in GATES:
        n, events = (int(v) for v in tallies.get(name, (0, 0)))
        p0, detect, active = bases[name]
        p1 = min(p0 + detect, 0.99)
        results.append(GateResult(name, n, events, p0, p1, log_likelihood_ratio(n, events, p0, p1) if n else 0.0,
                                  threshold, active))
    return results
