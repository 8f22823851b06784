"""Capture: what the service stores of its predictions, with feedback and privacy by default.

:class:`SqliteCaptureStore` is the embedded store (docs/capture.md); :class:`CapturePolicy` decides what is
captured; :mod:`speciesclf.capture.privacy` strips image metadata and coarsens locations.
"""

from .feedback import SPECIAL_LABELS, TRUST, resolve_label
from .sqlite import SqliteCaptureStore
from .store import (CaptureDatabaseError, CaptureError, CapturePolicy, CaptureStore, FeedbackNotFound,
                    InvalidFeedbackLabel, new_prediction_id, prediction_id_time)

__all__ = [
    "CaptureStore",
    "SqliteCaptureStore",
    "CapturePolicy",
    "CaptureError",
    "CaptureDatabaseError",
    "FeedbackNotFound",
    "InvalidFeedbackLabel",
    "new_prediction_id",
    "prediction_id_time",
    "resolve_label",
    "SPECIAL_LABELS",
    "TRUST",
]
