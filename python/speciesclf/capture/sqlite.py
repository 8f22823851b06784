"""The embedded capture store: records in SQLite (WAL), images in a content-addressed folder.

Layout under ``root``::

    records.sqlite3            records, feedback and the image table (WAL journal, synchronous=NORMAL)
    images/ab/cdef...          each stored image once, named by the sha256 of its stored (stripped) bytes

Nothing is written on the caller's thread: :meth:`SqliteCaptureStore.capture` decides and queues; one
writer thread strips metadata, writes images (tmp + fsync + rename) and then inserts their records in one
transaction per batch. An image is on disk before any record names it, so a crash leaves at most images no
record names, which the next :meth:`purge` removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CodedError, ImageError, error_code
from . import feedback as fb
from .store import (CaptureDatabaseError, CapturePolicy, CaptureStore, FeedbackNotFound,
                    id_floor, is_prediction_id, new_prediction_id, prediction_id_time)

__all__ = ["SqliteCaptureStore"]

log = logging.getLogger("speciesclf.capture")

SCHEMA_VERSION = 1
ORPHAN_GRACE_S = 60.0  # an image younger than this may belong to a batch another process is committing
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256
MAX_SUBJECT_CHARS = 128
MAX_REQUEST_ID_CHARS = 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT NOT NULL UNIQUE,          -- the prediction id: time-ordered
    t REAL NOT NULL,                  -- Unix seconds, the id's time
    model TEXT, version TEXT, arm TEXT,
    label TEXT, guess TEXT, scientific_name TEXT, score REAL, unknown INTEGER NOT NULL,
    open_set_score REAL, top_k TEXT, timings TEXT,
    error_code TEXT, error_message TEXT,
    reason TEXT NOT NULL, disagreement INTEGER NOT NULL, request_id TEXT, consent INTEGER NOT NULL,
    image_sha256 TEXT, image_format TEXT, width INTEGER, height INTEGER, image_bytes INTEGER,
    orientation INTEGER, image_error TEXT,
    source_sha256 TEXT, source_bytes INTEGER,
    metadata TEXT, subject TEXT, lat REAL, lon REAL, embedding BLOB,
    feedback_label TEXT, has_feedback INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_review ON records(unknown, has_feedback, id);
CREATE INDEX IF NOT EXISTS records_version ON records(version, id);
CREATE INDEX IF NOT EXISTS records_label ON records(label, id);
CREATE INDEX IF NOT EXISTS records_subject ON records(subject) WHERE subject IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_image ON records(image_sha256) WHERE image_sha256 IS NOT NULL;
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT PRIMARY KEY, bytes INTEGER NOT NULL, format TEXT NOT NULL, t REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY, prediction_id TEXT NOT NULL, label TEXT NOT NULL, source TEXT NOT NULL,
    comment TEXT, t REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_prediction ON feedback(prediction_id);
"""

_COLUMNS = ("id", "t", "model", "version", "arm", "label", "guess", "scientific_name", "score", "unknown",
            "open_set_score", "top_k", "timings", "error_code", "error_message", "reason", "disagreement",
            "request_id", "consent", "image_sha256", "image_format", "width", "height", "image_bytes",
            "orientation", "image_error", "source_sha256", "source_bytes", "metadata", "subject", "lat", "lon",
            "embedding")
_INSERT = f"INSERT OR IGNORE INTO records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_LISTED = ", ".join(c for c in (*_COLUMNS, "feedback_label", "has_feedback") if c != "embedding")


class _Item:
    __slots__ = ("id", "prediction", "image", "request_id", "consent", "metadata", "subject", "location",
                 "disagreement", "reason")

    def __init__(self, **fields: Any):
        for k, v in fields.items():
            setattr(self, k, v)


def _check_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA_KEYS:
        raise CodedError(422, "invalid_request",
                         f"metadata must be an object of at most {MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METADATA_KEY_CHARS:
            raise CodedError(422, "invalid_request",
                             f"metadata keys must be strings of 1..{MAX_METADATA_KEY_CHARS} characters, got {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CodedError(422, "invalid_request", f"metadata[{key!r}] must be a finite number")
        if not (value is None or isinstance(value, (bool, int, float))
                or (isinstance(value, str) and len(value) <= MAX_METADATA_VALUE_CHARS)):
            raise CodedError(422, "invalid_request", f"metadata[{key!r}] must be null, a boolean, a number or a "
                             f"string of at most {MAX_METADATA_VALUE_CHARS} characters")
    return json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))


def _check_location(location: Any) -> tuple[float, float] | None:
    if location is None:
        return None
    try:
        lat, lon = location
        ok = all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in (lat, lon))
    except (TypeError, ValueError):
        ok = False
    if not ok or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise CodedError(422, "invalid_request", f"location must be (lat, lon) in degrees, got {location!r}")
    return float(lat), float(lon)


def _check_text(name: str, value: Any, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        raise CodedError(422, "invalid_request", f"{name} must be 1..{limit} printable characters, got {value!r}")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteCaptureStore(CaptureStore):
    """See the module docstring; the parameters are described in docs/capture.md.

    ``labels`` (names, Label objects or (name, scientific_name) pairs) is the label set feedback is checked
    against when :meth:`add_feedback` is given none."""

    def __init__(self, root: str | Path, *, policy: CapturePolicy | None = None, max_age_s: float | None = None,
                 max_bytes: int | None = None, queue_size: int = 10000, batch_size: int = 256,
                 flush_interval_s: float = 0.2, sensitive_labels: Iterable[str] = frozenset(),
                 location_grid_km: float = 10.0, labels: Iterable[Any] | None = None):
        if queue_size < 1 or batch_size < 1 or flush_interval_s <= 0:
            raise ValueError("queue_size and batch_size must be >= 1 and flush_interval_s > 0")
        if max_age_s is not None and max_age_s <= 0 or max_bytes is not None and max_bytes <= 0:
            raise ValueError("max_age_s and max_bytes must be above 0 (or None for no limit)")
        if location_grid_km <= 0:
            raise ValueError(f"location_grid_km must be above 0, got {location_grid_km}")
        self.root = Path(root)
        self.policy = policy or CapturePolicy()
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.sensitive_labels = frozenset(fb._key(s) for s in sensitive_labels)
        self.location_grid_km = location_grid_km
        self._labels = None if labels is None else fb.LabelSet(labels)
        self.images_dir = self.root / "images"
        self.db_path = self.root / "records.sqlite3"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()  # writes: the writer thread, feedback, purge, erase (under _db_lock)
        self._reader = self._connect(check=False)  # queries, under _read_lock; WAL lets them read alongside
        self._db_lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._counts = {"captured": 0, "dropped": 0, "skipped": 0, "written": 0, "write_errors": 0,
                        "lost": 0, "not_consented": 0}
        self._counts_lock = threading.Lock()
        self._enabled = True
        self._closed = False
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run, name="speciesclf-capture-writer", daemon=True)
        self._writer.start()

    # -- opening -------------------------------------------------------------------------------------------

    def _connect(self, check: bool = True) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA secure_delete=ON")  # erased rows are overwritten, not left in free pages
            if check:
                found = db.execute("PRAGMA quick_check").fetchone()[0]
                if found != "ok":
                    raise sqlite3.DatabaseError(found)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise CaptureDatabaseError(
                        f"{self.db_path}: written by a newer speciesclf (schema {version}, this one reads "
                        f"{SCHEMA_VERSION}); upgrade speciesclf or capture into another folder")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException as e:
            db.close()
            if not isinstance(e, sqlite3.DatabaseError):
                raise
            raise CaptureDatabaseError(
                f"{self.db_path}: the capture database is damaged or not a SQLite database ({e}); move it "
                f"aside (its images under {self.images_dir} stay usable) or capture into another folder") from e
        return db

    # -- the hot path --------------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def capture(self, prediction: Any, image: bytes | None = None, *, request_id: str | None = None,
                consent: bool | None = None, metadata: Mapping[str, Any] | None = None,
                subject: str | None = None, location: tuple[float, float] | None = None,
                disagreement: bool = False, prediction_id: str | None = None) -> str | None:
        # Bad client input is the caller's to answer (422) whatever the policy decides, so it is checked first.
        metadata_json = _check_metadata(metadata)
        location = _check_location(location)
        subject = _check_text("subject", subject, MAX_SUBJECT_CHARS)
        request_id = _check_text("request_id", request_id, MAX_REQUEST_ID_CHARS)
        if prediction_id is not None and not is_prediction_id(prediction_id):
            raise ValueError(f"prediction_id must come from new_prediction_id(), got {prediction_id!r}")
        if self._closed or not self._enabled:
            self._count("skipped")
            return None
        reason = self.policy.reason(prediction, disagreement=disagreement)
        if reason is None:
            return None
        consented = self.policy.consents(consent)
        if not consented:
            image = metadata_json = subject = location = None
        pid = prediction_id or new_prediction_id()
        item = _Item(id=pid, prediction=prediction, image=None if image is None else bytes(image),
                     request_id=request_id, consent=consented, metadata=metadata_json, subject=subject,
                     location=location, disagreement=bool(disagreement), reason=reason)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count("dropped")
            return None
        self._count("captured")
        if not consented:
            self._count("not_consented")
        return pid

    # -- the writer ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.flush_interval_s)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # close()'s wake-up comes after everything else
                    self._queue.put_nowait(None)
                    self._queue.task_done()
                    break
                batch.append(item)
            try:
                if self._enabled:
                    self._write(batch)
                else:
                    self._count("lost", len(batch))
            except Exception as e:  # noqa: BLE001 - a storage failure must never reach predictions
                self._disable(e, len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _disable(self, error: BaseException, lost: int) -> None:
        self._count("write_errors")
        self._count("lost", lost)
        if self._enabled:
            self._enabled = False
            full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            full = full or "full" in str(error)
            log.error("capture turned off after a write failure%s: %s: %s (predictions continue; %d records "
                      "lost; resume() turns it back on)", " (disk full)" if full else "", type(error).__name__,
                      error, lost)

    def _row(self, item: _Item, stored: dict[str, Any] | None) -> tuple:
        p = item.prediction
        model, _, version = (p.model or "").partition("@")
        error = p.error
        location = item.location
        sensitive = any(n and fb._key(n) in self.sensitive_labels for n in (p.label, p.guess))
        lat = lon = None
        if location is not None and not sensitive:
            from .privacy import coarsen_location
            lat, lon = coarsen_location(location[0], location[1], self.location_grid_km)
        embedding = None
        if item.consent and getattr(p, "embedding", None) is not None:
            embedding = np.asarray(p.embedding, dtype=np.float16).tobytes()
        image = item.image
        stored = stored or {}
        return (
            item.id, prediction_id_time(item.id), model, version or None, p.arm,
            p.label, p.guess, p.scientific_name, p.score, int(bool(p.unknown)), p.open_set_score,
            json.dumps([[name, float(score)] for name, score in p.top_k], separators=(",", ":")),
            json.dumps({k: float(v) for k, v in (p.timings or {}).items()}, separators=(",", ":")),
            None if error is None else error_code(error), None if error is None else str(error)[:1000],
            item.reason, int(item.disagreement), item.request_id, int(item.consent),
            stored.get("sha256"), stored.get("format"), stored.get("width"), stored.get("height"),
            stored.get("bytes"), stored.get("orientation"), stored.get("error"),
            None if image is None else hashlib.sha256(image).hexdigest(), None if image is None else len(image),
            item.metadata, item.subject, lat, lon, embedding,
        )

    def _store_image(self, data: bytes, written_dirs: set[Path]) -> dict[str, Any]:
        from .privacy import strip_metadata

        try:
            stripped = strip_metadata(data)
        except ImageError as e:  # undecodable: the record keeps its sha256 and size only
            return {"error": f"{type(e).__name__}: {e}"[:300]}
        sha = hashlib.sha256(stripped.data).hexdigest()
        path = self._image_file(sha)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.parent / f".{sha}.{secrets.token_hex(4)}.tmp"
            try:
                with open(tmp, "xb") as f:
                    f.write(stripped.data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            written_dirs.add(path.parent)
        return {"sha256": sha, "format": stripped.format, "width": stripped.width, "height": stripped.height,
                "bytes": len(stripped.data), "orientation": stripped.orientation}

    def _write(self, batch: list[_Item]) -> None:
        with self._db_lock:
            written_dirs: set[Path] = set()
            rows, images = [], {}
            for item in batch:
                stored = None
                if item.consent and item.image:
                    stored = self._store_image(item.image, written_dirs)
                    if "sha256" in stored:
                        images[stored["sha256"]] = (stored["sha256"], stored["bytes"], stored["format"], time.time())
                rows.append(self._row(item, stored))
            for d in written_dirs:  # the renames are durable before any record names their files
                _fsync_dir(d)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO images (sha256, bytes, format, t) VALUES (?, ?, ?, ?)",
                                     list(images.values()))
                self._db.executemany(_INSERT, rows)
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        self._count("written", len(rows))

    # -- lifecycle ----------------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        if not self._writer.is_alive():
            return self._queue.unfinished_tasks == 0
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # new captures are refused; those queued are written
        self.flush()
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes the writer at once rather than after flush_interval_s
        self._writer.join()
        with self._db_lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
        with self._read_lock:
            self._reader.close()

    def resume(self) -> None:
        """Turn capture back on after a write failure turned it off (once the disk has room again)."""
        self._enabled = True

    @property
    def enabled(self) -> bool:
        return self._enabled and not self._closed

    def stats(self) -> dict[str, Any]:
        with self._read_lock:
            records = self._reader.execute("SELECT count(*) FROM records").fetchone()[0]
            images, image_bytes = self._reader.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM images").fetchone()
            pages = self._reader.execute("PRAGMA page_count").fetchone()[0]
            free = self._reader.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = self._reader.execute("PRAGMA page_size").fetchone()[0]
        with self._counts_lock:
            counts = dict(self._counts)
        return {"records": records, "images": images, "image_bytes": image_bytes,
                "database_bytes": (pages - free) * page_size, "bytes": image_bytes + (pages - free) * page_size,
                "queue_depth": self._queue.qsize(), "enabled": self.enabled, **counts}

    # -- reading -------------------------------------------------------------------------------------------

    def _image_file(self, sha: str) -> Path:
        return self.images_dir / sha[:2] / sha[2:]

    @staticmethod
    def _record(row: sqlite3.Row | tuple, names: list[str]) -> dict[str, Any]:
        r = dict(zip(names, row))
        image = None
        if r["image_sha256"]:
            image = {"sha256": r["image_sha256"], "format": r["image_format"], "width": r["width"],
                     "height": r["height"], "bytes": r["image_bytes"], "orientation": r["orientation"]}
        return {
            "prediction_id": r["id"], "time": r["t"], "model": r["model"], "version": r["version"],
            "arm": r["arm"], "label": r["label"], "guess": r["guess"], "scientific_name": r["scientific_name"],
            "score": r["score"], "unknown": bool(r["unknown"]), "open_set_score": r["open_set_score"],
            "top_k": [tuple(x) for x in json.loads(r["top_k"] or "[]")], "timings": json.loads(r["timings"] or "{}"),
            "error": None if r["error_code"] is None else {"code": r["error_code"], "message": r["error_message"]},
            "reason": r["reason"], "disagreement": bool(r["disagreement"]), "request_id": r["request_id"],
            "consent": bool(r["consent"]), "image": image, "image_error": r["image_error"],
            "source_sha256": r["source_sha256"], "source_bytes": r["source_bytes"],
            "metadata": None if r["metadata"] is None else json.loads(r["metadata"]), "subject": r["subject"],
            "location": None if r["lat"] is None else (r["lat"], r["lon"]),
            "feedback_label": r["feedback_label"], "has_feedback": bool(r["has_feedback"]),
        }

    def query(self, *, since: float | None = None, until: float | None = None, version: str | None = None,
              arm: str | None = None, label: str | None = None, unknown: bool | None = None,
              has_feedback: bool | None = None, limit: int = 100, after_id: str | None = None
              ) -> list[dict[str, Any]]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise ValueError(f"limit must be an int in 1..10000, got {limit!r}")
        where, args = [], []
        # Ids sort by time, so a time range is an id range: one index serves the filter, the order and paging.
        if since is not None:
            where.append("id >= ?"), args.append(id_floor(since))
        if until is not None:
            where.append("id < ?"), args.append(id_floor(until))
        if after_id is not None:
            where.append("id > ?"), args.append(after_id)
        if version is not None:
            name, at, ver = version.rpartition("@")
            if at:
                where.append("model = ? AND version = ?"), args.extend((name, ver))
            else:
                where.append("version = ?"), args.append(version)
        for column, value in (("arm", arm), ("label", label)):
            if value is not None:
                where.append(f"{column} = ?"), args.append(value)
        for column, value in (("unknown", unknown), ("has_feedback", has_feedback)):
            if value is not None:
                where.append(f"{column} = ?"), args.append(int(bool(value)))
        sql = (f"SELECT {_LISTED} FROM records {'WHERE ' + ' AND '.join(where) if where else ''} "
               f"ORDER BY id LIMIT ?")
        with self._read_lock:
            cursor = self._reader.execute(sql, (*args, limit))
            names = [d[0] for d in cursor.description]
            return [self._record(row, names) for row in cursor.fetchall()]

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        with self._read_lock:
            cursor = self._reader.execute(f"SELECT {_LISTED}, embedding FROM records WHERE id = ?", (prediction_id,))
            names = [d[0] for d in cursor.description]
            row = cursor.fetchone()
            if row is None:
                return None
            entries = self._reader.execute(
                "SELECT id, label, source, comment, t FROM feedback WHERE prediction_id = ? ORDER BY id",
                (prediction_id,)).fetchall()
        record = self._record(row, names)
        blob = row[names.index("embedding")]
        record["embedding"] = None if blob is None else np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        record["feedback"] = [{"label": e[1], "source": e[2], "comment": e[3], "time": e[4]} for e in entries]
        return record

    def image_path(self, prediction_id: str) -> Path | None:
        with self._read_lock:
            row = self._reader.execute("SELECT image_sha256 FROM records WHERE id = ?", (prediction_id,)).fetchone()
        return None if row is None or row[0] is None else self._image_file(row[0])

    # -- feedback ------------------------------------------------------------------------------------------

    def add_feedback(self, prediction_id: str, label: str, *, source: str = "user", comment: str | None = None,
                     labels: Iterable[Any] | None = None) -> dict[str, Any]:
        label_set = fb.LabelSet(labels) if labels is not None else self._labels
        if label_set is None:
            raise TypeError("add_feedback needs the model's labels: pass labels= here or to the store")
        name = label_set.resolve(label)
        source = fb.check_source(source)
        comment = fb.check_comment(comment)
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM records WHERE id = ?", (prediction_id,)).fetchone() is None:
                    raise FeedbackNotFound(f"no captured prediction {prediction_id!r} (never captured, purged or erased)")
                self._db.execute("INSERT INTO feedback (prediction_id, label, source, comment, t) VALUES (?, ?, ?, ?, ?)",
                                 (prediction_id, name, source, comment, time.time()))
                entries = [{"id": e[0], "label": e[1], "source": e[2], "time": e[3]} for e in self._db.execute(
                    "SELECT id, label, source, t FROM feedback WHERE prediction_id = ?", (prediction_id,))]
                winner = fb.resolved(entries)
                self._db.execute("UPDATE records SET feedback_label = ?, has_feedback = 1 WHERE id = ?",
                                 (winner, prediction_id))
                if fb._key(winner) in self.sensitive_labels:  # a person named a sensitive species: no location
                    self._db.execute("UPDATE records SET lat = NULL, lon = NULL WHERE id = ?", (prediction_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return {"prediction_id": prediction_id, "label": name, "resolved_label": winner, "feedback": len(entries)}

    def feedback_accuracy(self, *, version: str | None = None, arm: str | None = None) -> dict[str, Any]:
        where, args = ["has_feedback = 1"], []
        if version is not None:
            name, at, ver = version.rpartition("@")
            where.append("model = ? AND version = ?" if at else "version = ?")
            args.extend((name, ver) if at else (version,))
        if arm is not None:
            where.append("arm = ?"), args.append(arm)
        with self._read_lock:
            rows = self._reader.execute(f"SELECT label, feedback_label FROM records WHERE {' AND '.join(where)}",
                                        args).fetchall()
        correct = sum(fb.is_correct(model_label, person) for model_label, person in rows)
        return {"labelled": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None}

    # -- retention and erasure -----------------------------------------------------------------------------

    def _delete_records(self, where: str, args: tuple) -> tuple[int, int]:
        """Delete matching records and their feedback (inside a transaction); (records, feedback)."""
        ids = [r[0] for r in self._db.execute(f"SELECT id FROM records WHERE {where}", args)]
        feedback = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            feedback += self._db.execute(f"DELETE FROM feedback WHERE prediction_id IN ({marks})", chunk).rowcount
            self._db.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
        return len(ids), feedback

    def _unreferenced_images(self) -> int:
        """Delete image rows and files no record names (inside the lock, after the records' commit)."""
        gone = [r[0] for r in self._db.execute(
            "SELECT sha256 FROM images WHERE NOT EXISTS (SELECT 1 FROM records WHERE image_sha256 = images.sha256)")]
        for sha in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._image_file(sha))
        self._db.executemany("DELETE FROM images WHERE sha256 = ?", [(s,) for s in gone])
        return len(gone)

    def _in_transaction(self, work):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return result

    def purge(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        out = {"records": 0, "feedback": 0, "images": 0, "orphans": 0}
        with self._db_lock:
            if self.max_age_s is not None:
                r, f = self._in_transaction(lambda: self._delete_records("id < ?", (id_floor(now - self.max_age_s),)))
                out["records"] += r
                out["feedback"] += f
            out["images"] += self._in_transaction(self._unreferenced_images)
            while self.max_bytes is not None and (excess := self._bytes() - self.max_bytes) > 0:
                last = self._oldest_to_free(excess)
                if last is None:
                    break
                r, f = self._in_transaction(lambda: self._delete_records("id <= ?", (last,)))
                out["records"] += r
                out["feedback"] += f
                out["images"] += self._in_transaction(self._unreferenced_images)
                if r == 0:
                    break
            out["orphans"] = self._remove_orphan_files(now)
        if out["records"]:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return out

    def _oldest_to_free(self, excess: int) -> str | None:
        """The id up to which the oldest records free about ``excess`` bytes (their images, if no newer
        record names them too, and their share of the database)."""
        records = self._db.execute("SELECT count(*) FROM records").fetchone()[0]
        if not records:
            return None
        per_record = self._bytes_in_database() / records
        freed, seen, last = 0.0, set(), None
        for pid, sha, size in self._db.execute("SELECT id, image_sha256, image_bytes FROM records ORDER BY id"):
            last = pid
            freed += per_record
            if sha is not None and sha not in seen:
                seen.add(sha)
                freed += size
            if freed >= excess:
                break
        return last

    def _bytes_in_database(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0] - self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * self._db.execute("PRAGMA page_size").fetchone()[0]

    def _bytes(self) -> int:
        image_bytes = self._db.execute("SELECT coalesce(sum(bytes), 0) FROM images").fetchone()[0]
        return image_bytes + self._bytes_in_database()

    def _remove_orphan_files(self, now: float) -> int:
        """Files under images/ that no image row names (left by a crash between an image's write and its
        record's commit), and staging files; only those older than ORPHAN_GRACE_S, as another process
        sharing the folder may be about to commit its batch."""
        removed = 0
        for sub in self.images_dir.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in sub.iterdir():
                try:
                    if entry.stat().st_mtime > now - ORPHAN_GRACE_S:
                        continue
                except FileNotFoundError:
                    continue
                sha = sub.name + entry.name
                known = not entry.name.startswith(".") and self._db.execute(
                    "SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone() is not None
                if not known:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                    removed += 1
        return removed

    def erase(self, *, prediction_id: str | None = None, subject: str | None = None) -> dict[str, int]:
        if (prediction_id is None) == (subject is None):
            raise TypeError("erase takes exactly one of prediction_id= or subject=")
        where, args = ("id = ?", (prediction_id,)) if prediction_id is not None else ("subject = ?", (subject,))
        self.flush()  # a record still queued would escape the erasure
        with self._db_lock:
            records, feedback = self._in_transaction(lambda: self._delete_records(where, args))
            images = self._in_transaction(self._unreferenced_images)
            # Deleted pages are zeroed (secure_delete); the copies in the WAL go with a truncating checkpoint.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"records": records, "feedback": feedback, "images": images}

    # -- export --------------------------------------------------------------------------------------------

    def export_imagefolder(self, out_dir: str | Path, **options: Any) -> dict[str, int]:
        from .export import export_imagefolder

        return export_imagefolder(self, out_dir, **options)

    def export_parquet(self, path: str | Path, **options: Any) -> int:
        from .export import export_parquet

        return export_parquet(self, path, **options)

    def _iter_records(self, batch: int = 1000, **filters: Any):
        after = None
        while True:
            page = self.query(limit=batch, after_id=after, **filters)
            yield from page
            if len(page) < batch:
                return
            after = page[-1]["prediction_id"]

    def _feedback_of(self, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        with self._read_lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                for pid, label, source, comment, t in self._reader.execute(
                        f"SELECT prediction_id, label, source, comment, t FROM feedback WHERE prediction_id IN "
                        f"({','.join('?' * len(chunk))}) ORDER BY id", chunk):
                    out[pid].append({"label": label, "source": source, "comment": comment, "time": t})
        return out

    def _embeddings_of(self, ids: list[str]) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        with self._read_lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                out.update(self._reader.execute(
                    f"SELECT id, embedding FROM records WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return out

