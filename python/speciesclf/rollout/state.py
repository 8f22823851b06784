"""Where a rollout's state lives: in memory, or beside the versions in the registry (``<name>/rollout.json``,
replaced atomically under the name's lock, as aliases are).

The state is one JSON object, so that every worker of a service, and a restarted one, reads the same::

    {"name": "species100", "primary": "1.0.0", "candidate": "1.1.0", "policy": {...},
     "phase": "running", "step": 1, "weight": 0.25, "started_at": ..., "step_started_at": ...,
     "step_requests": 37, "counts": {...}, "history": [{"verdict": "advance", ...}, ...], "revision": 12}

``phase`` is one of PHASES. "promoting" is written before the alias moves and "promoted" after, so that a
crash in between leaves a state that says what is left to do (see :meth:`Rollout.recover`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["PHASES", "ACTIVE_PHASES", "MemoryStore", "RegistryStore", "RolloutStore", "empty_counts", "merge_counts"]

PHASES = ("running", "paused", "promoting", "promoted", "rolled_back", "aborted")
ACTIVE_PHASES = ("running", "paused")  # the candidate is loaded and may receive traffic
HISTORY_MAX = 200  # verdicts kept in the state (the log has them all)


class RolloutStore(Protocol):
    def read(self) -> dict | None: ...

    def update(self, change: Callable[[dict | None], dict | None]) -> dict | None:
        """``change(current)`` written in place of ``current`` as one step; returns what was written."""


class MemoryStore:
    """A rollout of two classifiers in one process (a notebook, a test): the state lives and dies with it."""

    def __init__(self, state: dict | None = None) -> None:
        self._state = copy.deepcopy(state)
        self._lock = threading.Lock()

    def read(self) -> dict | None:
        with self._lock:
            return copy.deepcopy(self._state)

    def update(self, change: Callable[[dict | None], dict | None]) -> dict | None:
        with self._lock:
            self._state = change(copy.deepcopy(self._state))
            return copy.deepcopy(self._state)


class RegistryStore:
    """The state of ``name``'s rollout in a :class:`~speciesclf.Registry`: shared by the worker processes of
    a service and kept across restarts."""

    def __init__(self, registry: Any, name: str) -> None:
        self.registry = registry
        self.name = name

    def read(self) -> dict | None:
        return self.registry.read_document(self.name, "rollout")

    def update(self, change: Callable[[dict | None], dict | None]) -> dict | None:
        return self.registry.update_document(self.name, "rollout", change)


def empty_counts() -> dict[str, Any]:
    return {
        "primary": {"requests": 0, "errors": 0, "feedback": 0, "feedback_wrong": 0},
        "candidate": {"requests": 0, "errors": 0, "fallbacks": 0, "feedback": 0, "feedback_wrong": 0},
        "gates": {},  # gate -> [n, events]
        "compare": {"compared": 0, "shed": 0, "failed": 0},
    }


def merge_counts(into: dict, delta: dict) -> dict:
    """Add the counts of ``delta`` (same shape as :func:`empty_counts`) to ``into``, in place."""
    for section, values in delta.items():
        target = into.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, list):
                old = target.get(key, [0, 0])
                target[key] = [int(a) + int(b) for a, b in zip(old, value)]
            else:
                target[key] = int(target.get(key, 0)) + int(value)
    return into
