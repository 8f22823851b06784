"""The extended model's last step: model outputs to probabilities over the reported classes, and "unknown"."""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

__all__ = ["PostProcessor", "Scores", "top_k_indices"]


@dataclasses.dataclass(frozen=True)
class Scores:
    probabilities: np.ndarray  # (N, K) over the reported classes, rows sum to 1
    unknown: np.ndarray        # (N,) bool
    evidence: np.ndarray       # (N,) the open-set score: what the unknown rule looks at (subset mass or top probability)
    finite: np.ndarray         # (N,) bool: the row's outputs were all finite (else its probabilities are not)


class PostProcessor:
    """Softmax (with temperature) for logits, an optional label subset renormalised, an open-set rule.

    ``label_subset`` keeps some outputs of a larger model; their probability mass before renormalising is
    the evidence for ``unknown_method="subset_mass"``: an image of none of the kept classes puts its mass
    elsewhere. ``"max_probability"`` flags an image whose best reported class is below the threshold.
    """

    def __init__(
        self,
        *,
        output_kind: Literal["logits", "probabilities"] = "logits",
        temperature: float = 1.0,
        label_subset: Sequence[int] | None = None,
        unknown_method: Literal["subset_mass", "max_probability"] | None = None,
        unknown_threshold: float | None = None,
    ):
        if output_kind not in ("logits", "probabilities"):
            raise ValueError(f"output_kind must be 'logits' or 'probabilities', got {output_kind!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if unknown_method not in (None, "subset_mass", "max_probability"):
            raise ValueError(f"unknown method must be 'subset_mass' or 'max_probability', got {unknown_method!r}")
        if unknown_method == "subset_mass" and label_subset is None:
            raise ValueError("the 'subset_mass' unknown rule needs a label subset")
        if unknown_method is not None and not (unknown_threshold is not None and 0 < unknown_threshold < 1):
            raise ValueError(f"unknown threshold must be in (0, 1), got {unknown_threshold!r}")
        self.output_kind = output_kind
        self.temperature = float(temperature)
        self.subset = None if label_subset is None else np.asarray(label_subset, dtype=np.intp)
        self.unknown_method = unknown_method
        self.unknown_threshold = unknown_threshold

    def __call__(self, outputs: np.ndarray) -> Scores:
        outputs = np.asarray(outputs, dtype=np.float64)
        if outputs.ndim != 2:
            raise ValueError(f"model outputs must be (batch, classes), got shape {outputs.shape}")
        finite = np.isfinite(outputs).all(axis=1)
        # A row with NaN or infinite outputs is flagged by `finite`; its arithmetic here warns for nothing.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if self.output_kind == "logits":
                z = outputs / self.temperature
                z -= z.max(axis=1, keepdims=True)
                probabilities = np.exp(z)
                probabilities /= probabilities.sum(axis=1, keepdims=True)
            else:
                probabilities = outputs
            if self.subset is not None:
                kept = probabilities[:, self.subset]
                mass = kept.sum(axis=1)
                probabilities = kept / np.maximum(mass, 1e-12)[:, None]
            else:
                mass = probabilities.sum(axis=1)
        # Finite outputs can still overflow here (a tiny temperature): such a row is no more usable.
        finite &= np.isfinite(probabilities).all(axis=1)
        top = probabilities.max(axis=1)
        # The open-set score: what the rule compares with its threshold. Without a rule it is still given
        # (the subset's mass where there is a subset, else the top probability) so thresholds can be swept.
        if self.unknown_method == "subset_mass" or (self.unknown_method is None and self.subset is not None):
            evidence = mass
        else:
            evidence = top
        if self.unknown_method is None:
            unknown = np.zeros(len(outputs), dtype=bool)
        else:
            unknown = evidence < self.unknown_threshold
        return Scores(probabilities, unknown, evidence, finite)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best columns of a 1-D ``scores`` row, best first; equal scores in column order.

    The same indices as ``np.argsort(-scores, kind="stable")[:k]``, without sorting the whole row: a
    1000-class row sorts in ~25 us, a cost paid per image on the thread that answers the batch. ``scores``
    must be finite."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if 4 * k >= n:  # selection saves nothing on a short row
        return np.argsort(-scores, kind="stable")[:k]
    kth = np.partition(scores, n - k)[n - k]  # the k-th best score
    # Everything at least as good as the k-th, in column order: a stable sort of these alone ranks ties by
    # column exactly as the full sort would, and a tie at the k-th score keeps its lowest columns.
    candidates = np.flatnonzero(scores >= kth)
    return candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
