"""Deployment: a primary version and optionally a candidate behind one predict API.

Routing is sticky: each request has a routing key (given, or a hash of its image bytes) hashed into
[0, 1); in a canary the key goes to the candidate iff its hash is below the weight, so raising the weight
only ever moves keys from the primary to the candidate. Comparisons of the two versions on the same
images (every shadow copy; a sample of a canary's candidate requests, run again on the primary) run on
one background thread from a bounded queue: when it is full, work is shed and counted, never waited for.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from .controller import Rollout, RolloutError
from .policy import RolloutPolicy
from .state import ACTIVE_PHASES, MemoryStore, RegistryStore

__all__ = ["Deployment", "CandidateRefused", "check_contract", "routing_hash", "routing_key_of"]

logger = logging.getLogger("speciesclf.rollout")
CANDIDATE_ALIAS = "candidate"
_LATENCY_WINDOW = 512  # primary call times kept per batch-size bucket for the latency gate
_MIN_LATENCY_REFERENCE = 20


class CandidateRefused(RolloutError):
    """A candidate that never received traffic: it failed to load or warm up, or its contract (input,
    labels, outputs) differs from the primary's. The message says why."""


def routing_hash(key: str | bytes) -> float:
    """A routing key's place in [0, 1): the same on every process and machine."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    digest = hashlib.blake2b(data, digest_size=8, person=b"speciesclf-rt").digest()
    return int.from_bytes(digest, "big") / 2**64


def routing_key_of(item: Any) -> bytes | None:
    """The default routing key of an image: a digest of its bytes (a file's contents, an array's or a PIL
    image's pixels). None where they cannot be read without consuming the input (a one-shot stream): such
    an item is routed at random; give ``routing_keys`` to make it sticky."""
    data = _image_bytes(item)
    return None if data is None else hashlib.blake2b(data, digest_size=16, person=b"speciesclf-img").digest()


def _image_bytes(item: Any) -> bytes | memoryview | None:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return item
    if isinstance(item, (str, os.PathLike)):
        text = os.fspath(item)
        try:
            return Path(text).read_bytes()
        except (OSError, ValueError):
            return text.encode("utf-8", "surrogatepass")
    if isinstance(item, np.ndarray):
        return np.ascontiguousarray(item).tobytes()
    tobytes = getattr(item, "tobytes", None)
    if callable(tobytes) and hasattr(item, "mode"):  # a PIL image
        return tobytes()
    if isinstance(item, io.IOBase) and item.seekable():
        at = item.tell()
        try:
            return item.read()
        finally:
            item.seek(at)
    return None


def check_contract(primary: Any, candidate: Any) -> str | None:
    """Why ``candidate`` cannot stand in for ``primary`` (None when it can): its preprocessing (input) or
    its labels (outputs) differ."""
    if primary.spec != candidate.spec:
        a, b = dataclasses.asdict(primary.spec), dataclasses.asdict(candidate.spec)
        diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b.get(k))
        return f"its preprocessing (model input) differs from the primary's ({diff})"
    if list(primary.labels) != list(candidate.labels):
        pl, cl = list(primary.labels), list(candidate.labels)
        if len(pl) != len(cl):
            return f"it reports {len(cl)} classes where the primary reports {len(pl)}"
        first = next(i for i, (x, y) in enumerate(zip(pl, cl)) if x != y)
        return f"its labels differ from the primary's (first at {first}: {cl[first]!r} vs {pl[first]!r})"
    return None


def _version_of(model: str) -> str:
    return model.rpartition("@")[2] if "@" in model else model


class _Slot:
    """One loaded version, closed once retired and no call holds it."""

    def __init__(self, classifier: Any, owned: bool) -> None:
        self.classifier = classifier
        self.version = _version_of(classifier.model)
        self.owned = owned
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    def acquire(self) -> _Slot:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        if self.owned:
            try:
                self.classifier.close()
            except Exception as e:  # noqa: BLE001 - a retired version's close must not fail the live path
                logger.warning("closing a retired version failed", extra={"fields": {"error": repr(e)}})


class _LatencyReference:
    """The primary's recent call times per image, per batch-size bucket (1, 2-3, 4-7, ...): a candidate call's
    time per image is compared with the primary's tail quantile in the same bucket, as batch size changes the
    time per image more than anything (and a call's time grows with its images within a bucket).
    The two arms' parts of a batch run one after the other, not side by side: sharing the cores would slow
    both (measured: 87% of a single version's throughput side by side, 97% one after the other) and make
    their times incomparable."""

    def __init__(self) -> None:
        self._times: dict[int, collections.deque] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bucket(batch: int) -> int:
        return max(batch, 1).bit_length()

    def add(self, batch: int, seconds: float) -> None:
        with self._lock:
            self._times.setdefault(self.bucket(batch), collections.deque(maxlen=_LATENCY_WINDOW)).append(seconds)

    def quantile(self, batch: int, q: float) -> float | None:
        with self._lock:
            times = self._times.get(self.bucket(batch))
            if times is None or len(times) < _MIN_LATENCY_REFERENCE:
                return None
            return float(np.quantile(np.fromiter(times, float), q))


@dataclasses.dataclass
class _CompareJob:
    other: _Slot  # the version that runs the images again
    other_arm: str
    items: list[Any]
    answered: list[Any]  # the answering arm's predictions, in item order
    top_k: int


class Deployment:
    """A primary version and optionally a candidate under a rollout, with :class:`~speciesclf.Classifier`'s
    predict API (``predict``, ``predict_batch``, ``predict_iter``), each taking ``routing_key(s)=``.

    In-process, from two classifiers: ``Deployment(primary, candidate, policy=parse_rollout("canary"))``
    (the state is in memory). From a registry, kept in step with its aliases: :meth:`from_registry`.
    ``observer(event, **fields)`` (optional) hears every batch and verdict, for metrics.
    """

    def __init__(self, primary: Any, candidate: Any = None, *, policy: RolloutPolicy | None = None,
                 rollout: Rollout | None = None, observer: Callable[..., None] | None = None,
                 sync_interval_s: float | None = 0.5, timer: Callable[[], float] = time.perf_counter,
                 rng: random.Random | None = None, own: bool = False) -> None:
        self._primary = _Slot(primary, owned=own)
        self._candidate: _Slot | None = None
        self.name = primary.model.rpartition("@")[0] or primary.model
        self.rollout = rollout if rollout is not None else Rollout(MemoryStore(), name=self.name)
        self.observer = observer
        self.timer = timer
        self._rng = rng or random.Random()
        self._swap = threading.Lock()  # the request path's: which versions a call uses
        # The control path's (sync, refresh, starting a candidate, close): one change of versions at a time,
        # so that no two of them act on the same state (a promotion swapped twice, a new candidate dropped).
        self._control = threading.RLock()
        self._latency = _LatencyReference()
        self._queue: queue.Queue = queue.Queue()
        self._queued_images = 0
        self._queue_lock = threading.Lock()
        self._closed = False
        self.refused: dict | None = None  # the last candidate refused: {"version", "reason", "at"}
        self.local = collections.Counter()  # this process's counts (requests/errors/fallbacks/shed per arm)
        self._registry = None
        self._watch: dict | None = None
        self._loader: Callable[[str], Any] | None = None
        self._wake = threading.Event()
        self._comparer = threading.Thread(target=self._compare_loop, name="speciesclf-compare", daemon=True)
        self._comparer.start()
        if candidate is not None:
            self._attach_candidate(candidate, owned=own)
            if policy is not None and not self.rollout.active:
                self.rollout.start(self._primary.version, self._candidate.version, policy)
        self._sync_interval = sync_interval_s
        self._syncer: threading.Thread | None = None
        if sync_interval_s is not None:
            self._syncer = threading.Thread(target=self._sync_loop, name="speciesclf-rollout", daemon=True)
            self._syncer.start()

    # --- building ----------------------------------------------------------------------------------

    @classmethod
    def from_registry(cls, ref: str, *, registry: Any = None, candidate: str | None = None,
                      policy: RolloutPolicy | None = None, loader: Callable[[str], Any] | None = None,
                      watch_interval_s: float | None = 2.0, **options: Any) -> Deployment:
        """The deployment of ``ref`` (``name@production``, ``name@1.2.0``) from a registry, with its rollout
        state in the registry. With ``watch_interval_s``, the aliases are polled (also on :meth:`refresh`):
        a moved ``production`` alias is loaded, warmed up and swapped in; pointing the ``candidate`` alias
        at a version starts ``policy`` (default: canary) on it. ``candidate`` starts one now (a reference)."""
        from ..bundles.registry import Registry, split_ref

        registry = registry if registry is not None else Registry()
        if not hasattr(registry, "resolve"):
            registry = Registry(registry)
        name, tag = split_ref(ref)
        load = loader or (lambda r: _load(r, registry))
        primary = load(ref)
        rollout = Rollout(RegistryStore(registry, name), name=name, registry=registry)
        try:
            deployment = cls(primary, rollout=rollout, own=True, **options)
        except BaseException:
            primary.close()
            raise
        deployment._registry = registry
        deployment._loader = load
        deployment._watch = {"tag": tag, "policy": policy or RolloutPolicy(), "interval": watch_interval_s,
                             "seen_candidate": None}
        try:
            deployment._resume()
            if candidate is not None:
                deployment.start_candidate(candidate, policy or RolloutPolicy())
            else:
                deployment.refresh()
        except BaseException:
            deployment.close()
            raise
        return deployment

    def _attach_candidate(self, classifier: Any, owned: bool) -> None:
        reason = check_contract(self._primary.classifier, classifier)
        if reason is None:
            reason = _warm_up(classifier)
        if reason is not None:
            version = _version_of(classifier.model)
            self.refused = {"version": version, "reason": reason, "at": time.time()}
            logger.warning("candidate refused", extra={"fields": {"rollout": self.name, "candidate": version,
                                                                   "reason": reason}})
            if owned:
                classifier.close()
            raise CandidateRefused(f"{classifier.model} receives no traffic: {reason}")
        with self._control:
            if self._closed:
                if owned:
                    classifier.close()
                raise RolloutError("Deployment is closed")
            with self._swap:
                old, self._candidate = self._candidate, _Slot(classifier, owned=owned)
        if old is not None:
            old.retire()

    def start_candidate(self, ref_or_classifier: Any, policy: RolloutPolicy | None = None, *,
                        restart: bool = False, force: bool = False) -> dict:
        """Load (a reference) or take (a classifier), check and warm up a candidate, then start ``policy``
        on it. A candidate that fails any of that raises :class:`CandidateRefused` and gets no traffic.
        A rollout of the same version already running (started by another worker) is joined, not restarted,
        unless ``restart``. A version the registry marked rejected is refused unless ``force``."""
        with self._control:
            return self._start_candidate(ref_or_classifier, policy, restart=restart, force=force)

    def _start_candidate(self, ref_or_classifier: Any, policy: RolloutPolicy | None, *, restart: bool,
                         force: bool) -> dict:
        policy = policy or (self._watch or {}).get("policy") or RolloutPolicy()
        if isinstance(ref_or_classifier, str) and self._registry is not None:
            # An alias ("m@candidate") is resolved first: the rejection is of the version it names.
            try:
                version = self._registry.resolve(ref_or_classifier).name
            except Exception as e:  # noqa: BLE001 - an unknown version is a refusal with its reason
                reason = " ".join(f"it cannot be found ({type(e).__name__}: {e})".split())
                self.refused = {"version": _version_of(ref_or_classifier), "reason": reason, "at": time.time()}
                raise CandidateRefused(f"{ref_or_classifier} receives no traffic: {reason}") from None
            ref_or_classifier = f"{self.name}@{version}"
            rejected = self._registry.rejections(self.name).get(version)
            if rejected is not None and not force:
                raise RolloutError(f"{self.name}@{version} was rejected ({rejected.get('reason')}); start it with "
                                   "force=True to try it again")
        if isinstance(ref_or_classifier, str):
            if self._loader is None:
                raise RolloutError("this deployment has no registry: pass a loaded Classifier")
            try:
                classifier = self._loader(ref_or_classifier)
            except Exception as e:  # noqa: BLE001 - any load failure is a refusal with its reason
                reason = " ".join(f"it failed to load ({type(e).__name__}: {e})".split())
                self.refused = {"version": _version_of(ref_or_classifier), "reason": reason, "at": time.time()}
                logger.warning("candidate refused", extra={"fields": {"rollout": self.name,
                                                                       "candidate": ref_or_classifier,
                                                                       "reason": reason}})
                raise CandidateRefused(f"{ref_or_classifier} receives no traffic: {reason}") from None
            owned = True
        else:
            classifier, owned = ref_or_classifier, False
        if _version_of(classifier.model) == self._primary.version:
            if owned:
                classifier.close()
            raise RolloutError(f"{classifier.model} is already the primary")
        self._attach_candidate(classifier, owned)
        self.refused = None
        if force and self._registry is not None:
            self._registry.unreject(self.name, _version_of(classifier.model))
        version = _version_of(classifier.model)
        state = self.rollout.state
        # A person forcing a judged version again starts it afresh; otherwise a rollout of the same version
        # is joined (and one judged while it loaded is not started again).
        fresh = restart or (force and (state is None or state["phase"] not in ACTIVE_PHASES))
        try:
            return self.rollout.start(self._primary.version, version, policy, replace=True, join=not fresh)
        except BaseException:
            self._drop_candidate()
            raise

    # --- the predict API ----------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self._primary.classifier.model

    @property
    def candidate_model(self) -> str | None:
        slot = self._candidate
        return None if slot is None else slot.classifier.model

    @property
    def labels(self) -> list[str]:
        return self._primary.classifier.labels

    @property
    def spec(self) -> Any:
        return self._primary.classifier.spec

    @property
    def device(self) -> str:
        return self._primary.classifier.device

    @property
    def splits_traffic(self) -> bool:
        """True while a canary sends some routing keys to a loaded candidate."""
        candidate, rollout = self._candidate, self.rollout
        return (candidate is not None and rollout.active and rollout.mode == "canary"
                and rollout.state["candidate"] == candidate.version and rollout.weight > 0)

    def arm_for(self, key: str | bytes | None) -> str | None:
        """The arm a routing key goes to now ("primary" or "candidate"); None for no key (routed at random).
        The service groups its batches by it, so that each arm runs whole batches."""
        if key is None:
            return None
        if not self.splits_traffic:
            return "primary"
        return "candidate" if routing_hash(key) < self.rollout.weight else "primary"

    def predict(self, x: Any, *, routing_key: str | bytes | None = None, **options: Any) -> Any:
        return self.predict_batch([x], routing_keys=None if routing_key is None else [routing_key], **options)[0]

    def predict_iter(self, iterable: Iterable[Any], *, batch_size: int | None = None,
                     routing_keys: Iterable[str | bytes] | None = None, **options: Any) -> Iterator[Any]:
        size = batch_size or self._primary.classifier.batch_size
        keys = iter(routing_keys) if routing_keys is not None else None
        if options.pop("progress", False):
            from tqdm import tqdm

            iterable = tqdm(iterable, unit="img", desc=self.model, file=sys.stderr, dynamic_ncols=True)
        chunk: list[Any] = []
        for item in iterable:
            chunk.append(item)
            if len(chunk) == size:
                yield from self.predict_batch(chunk, routing_keys=_take(keys, len(chunk)), **options)
                chunk = []
        if chunk:
            yield from self.predict_batch(chunk, routing_keys=_take(keys, len(chunk)), **options)

    def predict_batch(self, xs: Iterable[Any], *, top_k: int = 5, on_error: str = "return",
                      routing_keys: Iterable[str | bytes] | None = None, **options: Any) -> Any:
        """Predictions in order; each says which version answered (``model``) and on which arm (``arm``)."""
        from ..model.classifier import Predictions

        if self._closed:
            raise RuntimeError("Deployment is closed")
        if isinstance(xs, (str, bytes, bytearray, memoryview, os.PathLike)):
            raise TypeError(f"predict_batch takes an iterable of images, got one {type(xs).__name__}: use predict()")
        items = list(xs)
        keys = list(routing_keys) if routing_keys is not None else [None] * len(items)
        if len(keys) != len(items):
            raise ValueError(f"{len(keys)} routing keys for {len(items)} images")
        keys = [routing_key_of(x) if k is None else k for k, x in zip(keys, items)]  # None: the image's own
        with self._swap:
            primary = self._primary.acquire()
            candidate = self._candidate.acquire() if self._candidate is not None else None
        try:
            results = self._route(items, keys, primary, candidate, top_k, options)
        finally:
            primary.release()
            if candidate is not None:
                candidate.release()
        if on_error == "raise":
            for p in results:
                if p.error is not None:
                    raise p.error
        elif on_error != "return":
            raise ValueError(f"on_error must be 'return' or 'raise', got {on_error!r}")
        return Predictions(results)

    def _route(self, items: list[Any], keys: list[Any], primary: _Slot, candidate: _Slot | None, top_k: int,
               options: dict) -> list[Any]:
        rollout = self.rollout
        state = rollout.state
        # Only the version the shared state rolls out gets its traffic (and its statistics): another worker
        # or a person may have replaced it since this process loaded its candidate.
        serving = candidate is not None and rollout.active and state["candidate"] == candidate.version
        mode = rollout.mode if serving else None
        weight = rollout.weight if mode == "canary" else 0.0
        hashes = [routing_hash(k) if k is not None else self._rng.random() for k in keys]
        to_candidate = [i for i, h in enumerate(hashes) if h < weight]
        results: list[Any] = [None] * len(items)
        fallback: list[int] = []
        if to_candidate:
            fallback = self._run_candidate(items, to_candidate, candidate, results, top_k, options)
        to_primary = [i for i in range(len(items)) if results[i] is None]
        if to_primary:
            answered = self._run(primary, [items[i] for i in to_primary], top_k, options, "primary",
                                 routed=len(to_primary) - len(fallback))
            for i, p in zip(to_primary, answered):
                results[i] = dataclasses.replace(p, arm="primary")
        if mode == "shadow":
            share = rollout.policy().shadow_share
            chosen = [i for i in range(len(items)) if routing_hash(b"shadow" + _key_bytes(keys[i], hashes[i])) < share]
            self._submit(candidate, "candidate", items, results, chosen, top_k)
        elif mode == "canary" and to_candidate:
            share = min(1.0, rollout.policy().compare_share / max(weight, 1e-9))
            chosen = [i for i in to_candidate if i not in fallback and self._rng.random() < share]
            self._submit(primary, "primary", items, results, chosen, top_k)
        return results

    def _run(self, slot: _Slot, items: list[Any], top_k: int, options: dict, arm: str, routed: int) -> list[Any]:
        start = self.timer()
        try:
            predictions = slot.classifier.predict_batch(items, top_k=top_k, **options)
        except Exception:
            self._count(arm, slot.version, len(items), len(items), self.timer() - start)
            raise
        seconds = self.timer() - start
        failed = sum(1 for p in predictions if _model_failure(p))
        if arm == "primary" and self.rollout.active:
            self._latency.add(len(items), seconds / max(len(items), 1))
            self.rollout.record_request("primary", routed, errors=failed)
        self._count(arm, slot.version, len(items), failed, seconds)
        return predictions

    def _run_candidate(self, items: list[Any], chosen: list[int], slot: _Slot, results: list[Any], top_k: int,
                       options: dict) -> list[int]:
        """Answers ``chosen`` on the candidate into ``results``; returns those the primary must answer."""
        rollout = self.rollout
        start = self.timer()
        try:
            predictions = slot.classifier.predict_batch([items[i] for i in chosen], top_k=top_k, **options)
            seconds = self.timer() - start
        except Exception as e:  # noqa: BLE001 - the candidate's failure is answered by the primary
            predictions, seconds = None, self.timer() - start
            logger.debug("candidate call failed", extra={"fields": {"rollout": self.name, "error": repr(e)}})
        if predictions is None:
            failed = list(chosen)
        else:
            failed = [i for i, p in zip(chosen, predictions) if _model_failure(p)]
            for i, p in zip(chosen, predictions):
                if i not in failed:
                    results[i] = dataclasses.replace(p, arm="candidate")
        self._gate_latency(len(chosen), seconds)
        rollout.record_request("candidate", len(chosen), errors=len(failed))
        rollout.record_gate("errors", len(chosen), len(failed))
        if failed:
            rollout.record_fallback(len(failed))
            self.local["fallbacks"] += len(failed)
        self._count("candidate", slot.version, len(chosen), len(failed), seconds)
        return failed

    def _gate_latency(self, batch: int, seconds: float) -> None:
        gates = self.rollout.policy().gates
        reference = self._latency.quantile(batch, gates.latency_quantile)
        if reference is not None:
            per_image = seconds / max(batch, 1)
            self.rollout.record_gate("latency", 1, int(per_image > gates.latency_factor * reference))

    def _count(self, arm: str, version: str, images: int, errors: int, seconds: float) -> None:
        self.local[f"{arm}_requests"] += images
        self.local[f"{arm}_errors"] += errors
        if self.observer is not None:
            self.observer("batch", arm=arm, version=version, images=images, errors=errors, seconds=seconds)

    # --- comparisons on the same images ------------------------------------------------------------------

    def _submit(self, other: _Slot, other_arm: str, items: list[Any], answered: list[Any], chosen: list[int],
                top_k: int) -> None:
        chosen = [i for i in chosen if answered[i] is not None and answered[i].error is None]
        if not chosen:
            return
        limit = self.rollout.policy().shadow_queue
        with self._queue_lock:
            if self._queued_images + len(chosen) > limit:
                shed = True
            else:
                shed = False
                self._queued_images += len(chosen)
        if shed:
            self.rollout.record_compare(shed=len(chosen))
            self.local["shed"] += len(chosen)
            if self.observer is not None:
                self.observer("shed", images=len(chosen))
            return
        with self._swap:
            other.acquire()
        self._queue.put(_CompareJob(other, other_arm, [items[i] for i in chosen], [answered[i] for i in chosen],
                                    top_k))

    def _compare_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            start = time.monotonic()
            try:
                self._compare(job)
            except Exception as e:  # noqa: BLE001 - a comparison must never end the thread
                logger.warning("comparison failed", extra={"fields": {"rollout": self.name, "error": repr(e)}})
            finally:
                job.other.release()
                busy = time.monotonic() - start
                policy = self.rollout.policy()
                if policy is not None and policy.compare_budget < 1 and not self._closed:
                    # Rest so that busy time stays within the budget; what arrives meanwhile fills the
                    # queue and is shed there, counted.
                    time.sleep(busy * (1 / policy.compare_budget - 1))
                with self._queue_lock:
                    self._queued_images -= len(job.items)

    def _compare(self, job: _CompareJob) -> None:
        rollout = self.rollout
        start = self.timer()
        try:
            again = job.other.classifier.predict_batch(job.items, top_k=job.top_k)
        except Exception:  # noqa: BLE001
            again = None
        seconds = self.timer() - start
        n = len(job.items)
        if job.other_arm == "candidate":  # shadow: the copy is the candidate's request
            failed = n if again is None else sum(1 for p in again if _model_failure(p))
            rollout.record_request("candidate", n, errors=failed)
            rollout.record_gate("errors", n, failed)
            self._gate_latency(n, seconds)
            self._count("candidate", job.other.version, n, failed, seconds)
        if again is None:
            rollout.record_compare(failed=n)
            return
        pairs = [(a, b) for a, b in zip(job.answered, again) if a.error is None and b.error is None]
        if job.other_arm == "primary":
            pairs = [(b, a) for a, b in pairs]  # always (primary, candidate)
        drop = rollout.policy().gates.confidence_drop
        # Agreement is judged where either version names a class: two "unknown"s say nothing about the
        # labels (the unknown gate watches how often each says it).
        named = [(p, c) for p, c in pairs if not (p.unknown and c.unknown)]
        disagree = sum(1 for p, c in named if (None if p.unknown else p.label) != (None if c.unknown else c.label))
        unknown = sum(1 for p, c in pairs if c.unknown and not p.unknown)
        lower = sum(1 for p, c in pairs if (c.score or 0.0) < (p.score or 0.0) - drop)
        rollout.record_gate("agreement", len(named), disagree)
        rollout.record_gate("unknown", len(pairs), unknown)
        rollout.record_gate("confidence", len(pairs), lower)
        rollout.record_compare(compared=len(pairs))
        if self.observer is not None:
            self.observer("compare", images=len(pairs), disagreements=disagree)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait for the queued comparisons (tests, benchmarks); True when none is left."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._queue_lock:
                if self._queued_images == 0:
                    return True
            time.sleep(0.005)
        return False

    # --- keeping up with the rollout and the registry --------------------------------------------------

    def sync(self) -> dict | None:
        """Share this process's counts, let the rollout decide, and act on its state (swap in a promoted
        candidate, drop a rolled-back one). Called every ``sync_interval_s`` by a background thread."""
        with self._control:
            state = self.rollout.sync()
            self._follow(state)
        if self.observer is not None:
            for verdict, count in self.rollout.verdicts().items():
                self.observer("verdicts", verdict=verdict, total=count)
            self.observer("sync", status=self.rollout.status())
        return state

    def _follow(self, state: dict | None) -> None:
        """Make the loaded versions what ``state`` says (called under the control lock)."""
        candidate = self._candidate
        if state is None or candidate is None:
            return
        phase = state["phase"]
        if state.get("candidate") != candidate.version:
            # A rollout of another version (started by another worker or a person): this one is done;
            # refresh() loads the version the state names.
            self._drop_candidate()
        elif phase in ("promoted", "promoting"):
            self._promote_locally(candidate)
        elif phase in ("rolled_back", "aborted"):
            self._drop_candidate()

    def _promote_locally(self, candidate: _Slot) -> None:
        with self._swap:
            if self._candidate is not candidate:
                return
            old, self._primary, self._candidate = self._primary, candidate, None
        old.retire()

    def _drop_candidate(self) -> None:
        with self._swap:
            old, self._candidate = self._candidate, None
        if old is not None:
            old.retire()

    def _resume(self) -> None:
        """After a restart: finish a promotion or rollback cut short, and reload a running candidate."""
        with self._control:
            self.rollout.recover()
            state = self.rollout.sync()
            if state is None:
                return
            if state["phase"] in ACTIVE_PHASES and state["candidate"] != self._primary.version:
                try:
                    self._attach_candidate(self._loader(f"{self.name}@{state['candidate']}"), owned=True)
                except CandidateRefused:
                    self.rollout.abort(f"the candidate could not be loaded again: {self.refused['reason']}")
                except Exception as e:  # noqa: BLE001
                    self.rollout.abort(f"the candidate could not be loaded again ({type(e).__name__}: {e})")
            if self._watch is not None and self._registry is not None:
                # What the alias says now counts as seen: only a later change of it starts or ends a rollout.
                self._watch["seen_candidate"] = self._registry.aliases(self.name).get(CANDIDATE_ALIAS)

    def refresh(self) -> None:
        """Look at the registry's aliases now (also done every ``watch_interval_s``; the service does it on
        SIGHUP): a moved ``production`` is hot-reloaded, a new ``candidate`` starts the rollout policy."""
        if self._registry is None or self._watch is None:
            return
        with self._control:
            if self._closed:
                return
            self.sync()
            aliases = self._registry.aliases(self.name)
            tag = self._watch["tag"]
            production = aliases.get(tag) if not _is_version(tag) else None
            if production is not None and production != self._primary.version:
                self._reload_primary(production)
            self._watch_candidate(aliases.get(CANDIDATE_ALIAS))

    def _watch_candidate(self, target: str | None) -> None:
        state = self.rollout.state
        active = state is not None and state["phase"] in ACTIVE_PHASES
        if active and state["candidate"] != self._primary.version and (
                self._candidate is None or self._candidate.version != state["candidate"]):
            self._join(state["candidate"])  # another worker (or a person, through the CLI) started it
        if target is None:
            if active and self._watch["seen_candidate"] == state["candidate"]:
                self.rollout.abort("the candidate alias was removed")
                self._follow(self.rollout.state)
            self._watch["seen_candidate"] = None
            return
        if target == self._watch["seen_candidate"]:
            return
        self._watch["seen_candidate"] = target
        if target == self._primary.version or target in self._registry.rejections(self.name):
            return
        if state is not None and state.get("candidate") == target and state["phase"] not in ACTIVE_PHASES:
            return  # this version's rollout already ended
        if active and state["candidate"] == target:
            return
        try:
            self._start_candidate(f"{self.name}@{target}", None, restart=False, force=False)
        except (CandidateRefused, RolloutError) as e:
            logger.warning("candidate not started", extra={"fields": {"rollout": self.name, "candidate": target,
                                                                       "reason": str(e)}})

    def _join(self, version: str) -> None:
        try:
            self._attach_candidate(self._loader(f"{self.name}@{version}"), owned=True)
        except CandidateRefused:
            pass  # this process answers with the primary only; .refused says why
        except Exception as e:  # noqa: BLE001
            self.refused = {"version": version, "reason": f"it failed to load ({type(e).__name__}: {e})",
                            "at": time.time()}

    def _reload_primary(self, version: str) -> None:
        state = self.rollout.state
        candidate = self._candidate
        if candidate is not None and candidate.version == version:
            if state is not None and state["phase"] in ACTIVE_PHASES:
                self.rollout.promote(f"the {self._watch['tag']} alias was moved to the candidate")
            self._promote_locally(candidate)
            return
        if self._watch.get("bad_primary") == version:
            return  # refused before: tried again once the alias moves elsewhere
        try:
            classifier = self._loader(f"{self.name}@{version}")
        except Exception as e:  # noqa: BLE001 - the primary keeps serving; the reason is logged
            reason = " ".join(f"it failed to load ({type(e).__name__}: {e})".split())
            classifier = None
        else:
            reason = _warm_up(classifier)
        if reason is not None:
            if classifier is not None:
                classifier.close()
            self._watch["bad_primary"] = version
            logger.error("reload refused", extra={"fields": {"rollout": self.name, "version": version,
                                                              "reason": reason}})
            return
        self._watch["bad_primary"] = None
        if state is not None and state["phase"] in ACTIVE_PHASES:
            self.rollout.abort(f"the primary changed to {version} under the rollout")
            self._drop_candidate()
        with self._swap:
            old, self._primary = self._primary, _Slot(classifier, owned=True)
        old.retire()
        logger.info("primary reloaded", extra={"fields": {"rollout": self.name, "version": version}})

    def wake(self) -> None:
        """Make the background thread look at the registry now (the service calls it on SIGHUP)."""
        self._wake.set()

    def _sync_loop(self) -> None:
        last_watch = time.monotonic()  # from_registry looked just now
        while not self._closed:
            self._wake.wait(self._sync_interval)
            woken = self._wake.is_set()
            self._wake.clear()
            if self._closed:
                return
            try:
                interval = (self._watch or {}).get("interval")
                if self._registry is not None and (woken or (interval and time.monotonic() - last_watch >= interval)):
                    last_watch = time.monotonic()
                    self.refresh()
                else:
                    self.sync()
            except Exception as e:  # noqa: BLE001 - the watcher must outlive a bad registry state
                logger.error("rollout sync failed", extra={"fields": {"rollout": self.name,
                                                                       "error": f"{type(e).__name__}: {e}"}})

    # --- status and closing ------------------------------------------------------------------------

    def status(self) -> dict:
        """The versions, the rollout's state and gates, and this process's counts."""
        candidate = self._candidate
        return {"primary": self.model, "candidate": None if candidate is None else candidate.classifier.model,
                "rollout": self.rollout.status(), "refused": self.refused, "local": dict(self.local),
                "verdicts": self.rollout.verdicts()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        with self._control:  # waits for a refresh in progress (a candidate being loaded) to finish
            pass
        if self._syncer is not None:
            self._syncer.join()
        self._queue.put(None)
        self._comparer.join()
        try:
            self.rollout.sync()
        except Exception:  # noqa: BLE001 - the last counts are best effort at shutdown
            pass
        self._primary.retire()
        if self._candidate is not None:
            self._candidate.retire()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self.rollout.state
        extra = "" if state is None else f", {state['policy']['mode']} {state['phase']} at {self.rollout.weight:.0%}"
        return f"Deployment({self.model!r}, candidate={self.candidate_model!r}{extra})"


def _take(keys: Iterator | None, n: int) -> list | None:
    if keys is None:
        return None
    taken = [next(keys, None) for _ in range(n)]
    return taken


def _key_bytes(key: Any, fallback: float) -> bytes:
    if key is None:
        return repr(fallback).encode()
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def _model_failure(prediction: Any) -> bool:
    """A prediction the model failed on (not the image's own fault, which any version would share)."""
    return prediction.error is not None and not isinstance(prediction.error, ImageError)


def _is_version(tag: str) -> bool:
    from ..bundles.bundle import is_semver

    return is_semver(tag)


def _warm_up(classifier: Any) -> str | None:
    dummy = np.full((64, 64, 3), 127, dtype=np.uint8)
    try:
        warm = classifier.predict_batch([dummy], top_k=1)
    except Exception as e:  # noqa: BLE001
        return " ".join(f"its warm-up prediction failed ({type(e).__name__}: {e})".split())
    if warm[0].error is not None:
        return f"its warm-up prediction failed ({warm[0].error})"
    return None


def _load(ref: str, registry: Any) -> Any:
    from ..model.classifier import Classifier

    return Classifier.load(ref, registry=registry)
