"""Captured data out of the store, for training and analysis: an ImageFolder tree or a Parquet file.

Neither export carries what identifies a person (``subject``, ``request_id``, the location): they are for
whoever trains models, who needs images, labels and the model's answers, not who sent them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .feedback import SPECIAL_LABELS
from .store import CaptureError

__all__ = ["export_imagefolder", "export_parquet", "apply_orientation"]

_SUFFIX = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}


def apply_orientation(image: Any, orientation: int | None) -> Any:
    """A PIL image turned the way its recorded EXIF orientation says (the stored pixels are as sent)."""
    from ..preprocessing._pillow_backend import apply_orientation as turn

    return turn(image, orientation)


def _folder_name(label: str) -> str:
    # Label names are free text: no separators, and never "." or ".." or a hidden folder.
    name = label.replace("/", "_").replace("\\", "_").strip()
    return ("_" + name) if not name or name.startswith(".") else name


def export_imagefolder(store: Any, out_dir: str | Path, *, labels: Literal["feedback", "model"] = "feedback",
                       include_special: bool = False, **filters: Any) -> dict[str, int]:
    """Write ``out_dir/<label>/<prediction_id>.<ext>`` for every record with an image and a label.

    ``labels="feedback"`` takes each record's resolved feedback label (records without one are skipped);
    ``"model"`` takes the feedback label where there is one and the model's label otherwise (unknown
    answers without feedback are skipped). ``not_an_animal`` / ``unknown_species`` folders are written only
    with ``include_special``. Images with an EXIF orientation are written turned the right way up, as PNG
    (lossless); the others are copied as stored. ``filters`` are :meth:`query`'s (since, version, arm...).
    Returns {"images": written, "skipped": records without an image or a label}."""
    if labels not in ("feedback", "model"):
        raise ValueError(f"labels must be 'feedback' or 'model', got {labels!r}")
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for record in store._iter_records(**filters):
        label = record["feedback_label"] or (record["label"] if labels == "model" else None)
        path = store.image_path(record["prediction_id"])
        if label is None or path is None or (label in SPECIAL_LABELS and not include_special):
            skipped += 1
            continue
        folder = out / _folder_name(label)
        folder.mkdir(exist_ok=True)
        image = record["image"]
        if (image["orientation"] or 1) != 1:
            with Image.open(path) as decoded:
                apply_orientation(decoded, image["orientation"]).save(folder / f"{record['prediction_id']}.png")
        else:
            shutil.copyfile(path, folder / f"{record['prediction_id']}{_SUFFIX.get(image['format'], '')}")
        written += 1
    return {"images": written, "skipped": skipped}


def export_parquet(store: Any, path: str | Path, *, embeddings: bool = True, **filters: Any) -> int:
    """Write the records (with their feedback) to one Parquet file; returns the number of rows.

    Columns: the record's fields (top_k as a list of {label, score}; feedback as a list of {label, source,
    comment, time}), ``image_path`` relative to the store's root (null without an image) and, with
    ``embeddings``, the embedding as a list of float32 (stored as float16). Needs pyarrow (the ``capture``
    extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CaptureError("Parquet export needs pyarrow: pip install 'speciesclf[capture]'") from e
    rows: list[dict[str, Any]] = []
    for record in store._iter_records(**filters):
        rows.append(record)
    ids = [r["prediction_id"] for r in rows]
    feedback = store._feedback_of(ids)
    blobs = store._embeddings_of(ids) if embeddings else {}
    columns: dict[str, list[Any]] = {name: [] for name in (
        "prediction_id", "time", "model", "version", "arm", "label", "guess", "scientific_name", "score",
        "unknown", "open_set_score", "top_k", "timings", "error_code", "reason", "disagreement", "consent",
        "image_sha256", "image_format", "width", "height", "orientation", "image_path", "metadata",
        "feedback_label", "feedback")}
    if embeddings:
        columns["embedding"] = []
    for r in rows:
        image = r["image"] or {}
        sha = image.get("sha256")
        values = {
            **{k: r[k] for k in ("prediction_id", "time", "model", "version", "arm", "label", "guess",
                                 "scientific_name", "score", "unknown", "open_set_score", "reason",
                                 "disagreement", "consent", "feedback_label")},
            "top_k": [{"label": name, "score": float(score)} for name, score in r["top_k"]],
            "timings": json.dumps(r["timings"], sort_keys=True),
            "error_code": None if r["error"] is None else r["error"]["code"],
            "image_sha256": sha, "image_format": image.get("format"), "width": image.get("width"),
            "height": image.get("height"), "orientation": image.get("orientation"),
            "image_path": None if sha is None else f"images/{sha[:2]}/{sha[2:]}",
            "metadata": None if r["metadata"] is None else json.dumps(r["metadata"], sort_keys=True),
            "feedback": feedback[r["prediction_id"]],
        }
        if embeddings:
            blob = blobs.get(r["prediction_id"])
            values["embedding"] = None if blob is None else np.frombuffer(blob, np.float16).astype(np.float32).tolist()
        for name, value in values.items():
            columns[name].append(value)
    schema_types = {
        "top_k": pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())])),
        "feedback": pa.list_(pa.struct([("label", pa.string()), ("source", pa.string()),
                                        ("comment", pa.string()), ("time", pa.float64())])),
        "embedding": pa.list_(pa.float32()),
        "score": pa.float64(), "open_set_score": pa.float64(), "time": pa.float64(),
        "width": pa.int32(), "height": pa.int32(), "orientation": pa.int8(),
        "unknown": pa.bool_(), "disagreement": pa.bool_(), "consent": pa.bool_(),
    }
    table = pa.table({name: pa.array(values, type=schema_types.get(name, pa.string()))
                      for name, values in columns.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return len(rows)
