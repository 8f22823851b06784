"""The service's Deployment: when its model is a registry reference, a primary and a candidate kept in step
with the registry's aliases (see docs/rollout.md). Built in a worker thread at start-up."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import ServeConfig
from .logs import log

__all__ = ["build_deployment", "is_registry_reference", "registry_of"]

def registry_of(config: ServeConfig) -> Any:
    from ..bundles.registry import Registry

    return Registry(config.registry)


def is_registry_reference(source: Any, registry: Any) -> bool:
    """``name@alias`` or ``name@version`` of a name in ``registry``: not a bundle path, not a bare built-in name."""
    from ..bundles.registry import RegistryError, split_ref

    if not isinstance(source, str) or "@" not in source or Path(source).exists():
        return False
    try:
        name, _ = split_ref(source)
        return name in registry.names()
    except (RegistryError, OSError):
        return False


def build_deployment(ref: str, config: ServeConfig, load: Callable[..., Any], observer: Callable[..., None]) -> Any:
    """``Deployment.from_registry(ref)``, watching the aliases every ``config.watch_interval_s``, and the
    rollout of ``config.candidate`` started, unless the shared state already runs it (another worker, or
    this service before a restart, started it) or the registry rejected that version. A candidate that
    cannot be used is logged and shown in /v1/models; the primary serves either way."""
    from ..rollout import Deployment, RolloutError, parse_rollout

    registry = registry_of(config)
    policy = parse_rollout(config.rollout) if config.rollout is not None else None

    def loader(reference: str) -> Any:
        return load(reference, registry=registry)

    # The workers of one service start together: one at a time decides whether to start the candidate, so
    # that it is started once and the others (reading the state it wrote) load the same one.
    with _startup_lock(config.candidate is not None):
        deployment = Deployment.from_registry(ref, registry=registry, policy=policy, loader=loader,
                                              watch_interval_s=config.watch_interval_s, observer=observer)
        if config.candidate is not None:
            try:
                candidate = _candidate_to_start(deployment, registry, config.candidate)
                if candidate is not None:
                    deployment.start_candidate(candidate, policy)
            except RolloutError as e:  # CandidateRefused too: the deployment logged and kept why
                log("candidate not started", level=30, candidate=config.candidate, error=str(e))
            except BaseException:
                deployment.close()
                raise
    return deployment


def _candidate_to_start(deployment: Any, registry: Any, given: str) -> str | None:
    from ..bundles.registry import RegistryError
    from ..rollout import RolloutError
    from ..rollout.state import ACTIVE_PHASES

    name = deployment.name
    ref = given if "@" in given else f"{name}@{given}"
    if ref.partition("@")[0] != name:
        raise RolloutError(f"the candidate {given!r} is not a version of {name}, the model served")
    try:
        version = registry.resolve(ref).name
    except RegistryError:
        return ref  # start_candidate refuses it with the reason (and /v1/models shows it)
    state = deployment.rollout.state
    if state is not None and state.get("candidate") == version and state.get("phase") in ACTIVE_PHASES:
        return None  # already running, and loaded by from_registry: joining would load it a second time
    return ref  # start_candidate refuses a rejected version, with its reason


@contextlib.contextmanager
def _startup_lock(needed: bool) -> Iterator[None]:
    from . import _ENV_RUN_DIR  # the folder run(..., workers=N) gives its workers

    run_dir = os.environ.get(_ENV_RUN_DIR)
    if not needed or not run_dir or not os.path.isdir(run_dir):
        yield
        return
    import fcntl

    with open(os.path.join(run_dir, "candidate.lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
