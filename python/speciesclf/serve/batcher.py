"""Dynamic batching: requests wait in a bounded queue; one worker task coalesces them into inference calls.

All state lives on the event loop's thread; only ``classifier.predict_batch`` runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..rollout.deployment import routing_key_of
from .config import ServeConfig
from .metrics import Metrics

__all__ = ["Batcher", "QueueFull", "DeadlineExceeded", "ShuttingDown"]


class QueueFull(Exception):
    """The queue holds max_queue images already (HTTP 429)."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed: ``stage`` is "queued" (HTTP 503) or "inference" (HTTP 504)."""

    def __init__(self, stage: str):
        super().__init__(f"the request's deadline passed while {'queued' if stage == 'queued' else 'in inference'}")
        self.stage = stage


class ShuttingDown(Exception):
    """The service is draining and accepts no new work (HTTP 503)."""


class _Job:
    __slots__ = ("images", "top_k", "deadline", "future", "state", "enqueued", "dispatched", "results", "missing",
                 "largest_batch", "keys", "arm")

    def __init__(self, images: list[bytes], top_k: int, deadline: float, future: asyncio.Future,
                 keys: list[Any] | None = None, arm: str | None = None):
        self.images = images
        self.keys = keys  # with a Deployment: each image's routing key (the request's X-Routing-Key, or its bytes')
        self.arm = arm  # the arm all its images go to, or None (mixed, or no Deployment): batches group by it
        self.top_k = top_k
        self.deadline = deadline  # loop.time()
        self.future = future
        self.state = "queued"  # queued -> running -> done, or queued/running -> dropped
        self.enqueued = time.perf_counter()
        # A request of more images than a batch holds runs in slices over consecutive batches.
        self.dispatched = 0  # images handed to inference so far
        self.results: list[Any] = [None] * len(images)
        self.missing = len(images)  # images without a prediction yet
        self.largest_batch = 0


class Batcher:
    """Start with :meth:`start` on the running loop; :meth:`predict` from request handlers."""

    def __init__(self, classifier: Any, config: ServeConfig, metrics: Metrics):
        from ..rollout.deployment import Deployment

        self.classifier = classifier
        # Only a Deployment routes: a Classifier's predict_batch takes no routing keys.
        self._routes = isinstance(classifier, Deployment)
        self.config = config
        self.metrics = metrics
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # With batches_in_flight > 1 the next batch's decoding overlaps the current one's inference, and the
        # runtime is not left idle while the event loop sends one batch's answers and reads the next requests.
        self._executor = ThreadPoolExecutor(config.batches_in_flight, thread_name_prefix="speciesclf-serve-infer")
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._stopping = False
        self._throughput = 50.0  # images/s, a running estimate for Retry-After
        self.last_batch_size = 0

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.batches_in_flight)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="speciesclf-serve-batcher")

    async def predict(self, images: list[bytes], top_k: int, timeout_s: float,
                      routing_key: str | None = None) -> tuple[list[Any], int]:
        """Predictions for ``images`` (in order) and the size of the batch they ran in. ``routing_key`` (a
        Deployment's; default: each image's bytes) decides which version answers them."""
        if self._stopping or self._task is None:
            raise ShuttingDown("the service is shutting down")
        n = len(images)
        if timeout_s <= 0:  # the deadline went on reading the request: never queue work that is already late
            raise DeadlineExceeded("queued")
        if self._queued_images + n > self.config.max_queue:
            backlog = self._queued_images + self.metrics.in_flight
            raise QueueFull(max(1, int(backlog / max(self._throughput, 1.0) + 0.999)))
        loop = asyncio.get_running_loop()
        keys = arm = None
        if self._routes:
            if self.classifier.splits_traffic:
                keys = [routing_key if routing_key is not None else routing_key_of(image) for image in images]
                arms = {self.classifier.arm_for(key) for key in keys}
                arm = arms.pop() if len(arms) == 1 else None
            else:
                # No canary now: the image digests are not worth the event loop's time (the Deployment makes
                # any it needs, in the inference thread); a given key is kept, in case one starts meanwhile.
                keys = [routing_key] * len(images)
        job = _Job(images, top_k, loop.time() + timeout_s, loop.create_future(), keys, arm)
        self._queue.append(job)
        self._set_queued(self._queued_images + n)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            if job.future.done():  # the worker settled it first (e.g. found it expired in the queue)
                if job.future.cancelled():
                    raise DeadlineExceeded("queued") from None
                error = job.future.exception()  # also marks it retrieved: no "never retrieved" log line
                if error is None:
                    return job.future.result()
                raise error from None
            never_ran = job.dispatched == 0  # read before _drop changes the job
            self._drop(job)  # slices not yet dispatched are not run
            raise DeadlineExceeded("queued" if never_ran else "inference") from None
        except asyncio.CancelledError:  # the client went away: do not run its images
            self._drop(job)
            raise

    def _set_queued(self, n: int) -> None:
        self._queued_images = n
        self.metrics.queue_depth = n

    def _drop(self, job: _Job) -> None:
        if job.state == "done":
            return
        job.state = "dropped"
        try:
            self._queue.remove(job)
        except ValueError:
            return
        self._set_queued(self._queued_images - (len(job.images) - job.dispatched))

    async def _next_batch(self) -> list[tuple[_Job, int, int]] | None:
        """(job, first, end) slices of what is queued now, max_batch_size images in all: a large request is
        split rather than allowed to overflow the batch. Called only when the worker is free, so it never
        waits for company: requests coalesce by themselves while the previous inference runs, and a lone
        request on an idle worker is dispatched at once (waiting max_wait_ms for it would only add latency)."""
        while not self._queue:
            if self._stopping:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        batch: list[tuple[_Job, int, int]] = []
        room = self.config.max_batch_size
        now = time.perf_counter()
        # With a canary, a batch holds the head request's arm only (and requests of mixed arms): each version
        # then runs whole batches instead of two halves of each (measured: 90% of a single version's
        # throughput with halves). The head always goes first, so no request waits behind the other arm's.
        arm = self._queue[0].arm
        i = 0
        while i < len(self._queue) and room > 0:
            job = self._queue[i]
            if arm is not None and job.arm is not None and job.arm != arm:
                i += 1
                continue
            first = job.dispatched
            if first == 0:
                self.metrics.queue_wait(now - job.enqueued)
            end = min(len(job.images), first + room)
            batch.append((job, first, end))
            job.dispatched = end
            room -= end - first
            self._set_queued(self._queued_images - (end - first))
            if end == len(job.images):
                del self._queue[i]
            else:
                i += 1
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._slots.acquire()
                batch = await self._next_batch()
                if batch is None:
                    self._slots.release()
                    return
                task = loop.create_task(self._run_batch(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            if self._running:  # drain: what was dispatched finishes
                await asyncio.gather(*self._running, return_exceptions=True)

    async def _run_batch(self, batch: list[tuple[_Job, int, int]]) -> None:
        try:
            await self._infer(batch)
        finally:
            self._slots.release()

    async def _infer(self, batch: list[tuple[_Job, int, int]]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        live: list[tuple[_Job, int, int]] = []
        for job, first, end in batch:
            if job.future.done() or job.state == "dropped":
                continue
            if now >= job.deadline:  # expired while queued: never run late work
                queued = job.state == "queued"
                self._drop(job)
                job.future.set_exception(DeadlineExceeded("queued" if queued else "inference"))
                continue
            job.state = "running"
            live.append((job, first, end))
        if not live:
            return
        images = [image for job, first, end in live for image in job.images[first:end]]
        keys = [key for job, first, end in live for key in job.keys[first:end]] if self._routes else None
        top_k = max(job.top_k for job, _, _ in live)
        self.metrics.in_flight += len(images)
        self.metrics.batch(len(images))
        self.last_batch_size = len(images)
        start = time.perf_counter()
        try:
            predictions = await loop.run_in_executor(self._executor, self._predict, images, top_k, keys)
        except Exception as e:  # a runtime failure: every request of this batch gets it
            for job, _, _ in live:
                # A job dropped meanwhile (its request timed out or went away) has nobody to tell.
                if job.state != "dropped" and not job.future.done():
                    job.future.set_exception(e)
                self._drop(job)
            return
        finally:
            self.metrics.in_flight -= len(images)
        elapsed = max(time.perf_counter() - start, 1e-6)
        self._throughput = 0.8 * self._throughput + 0.2 * (len(images) / elapsed)
        at = 0
        for job, first, end in live:
            job.results[first:end] = predictions[at:at + end - first]
            at += end - first
            job.missing -= end - first
            job.largest_batch = max(job.largest_batch, len(images))
            if job.missing == 0 and job.state == "running":
                job.state = "done"
                if not job.future.done():
                    job.future.set_result((job.results, job.largest_batch))

    def _predict(self, images: list[bytes], top_k: int, keys: list[Any] | None = None) -> list[Any]:
        # In the inference thread: the per-stage histograms cost the event loop nothing.
        if keys is None:
            predictions = self.classifier.predict_batch(images, top_k=top_k)
        else:
            predictions = self.classifier.predict_batch(images, top_k=top_k, routing_keys=keys)
        self.metrics.stages(predictions)
        return predictions

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new work, finish what was accepted (up to ``drain_timeout_s``), then stop the worker."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
                for job in list(self._queue):
                    if not job.future.done():
                        job.future.set_exception(ShuttingDown("the service shut down before this request ran"))
                self._queue.clear()
                self._set_queued(0)
        self._executor.shutdown(wait=False)
