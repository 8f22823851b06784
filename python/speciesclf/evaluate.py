"""How well a model does on a labelled dataset: top-1/top-5, per-class figures, the unknown rate, and a sweep
of the open-set score's threshold (how many images get an answer, and how many of those answers are right).

A dataset is a folder with one subfolder per class, or a labels CSV (``load_dataset``). Its classes meet the
model's by name (case, ``_``, ``-`` and spaces ignored: ``Blue_Jay`` is ``blue jay``) or by ``class_index``
taken as the model's output index (for a dataset in the model's own label space). Images of classes the model
does not have are *other-class* images: the right answer for them is "unknown", and the figures say how often
the model gives it (``unknown_rate_other``, ``other_rejected`` in the sweep).

``evaluate(classifier, dataset)`` is the library function (the CLI's ``speciesclf evaluate`` prints its
report); it takes a :class:`~speciesclf.Classifier`, a model reference to load, or any predictor with
``predict_iter`` / ``predict_batch`` (or a callable from a list of images to a list of Predictions) and
``labels``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DatasetError",
    "Dataset",
    "ClassFigures",
    "ThresholdPoint",
    "EvaluationReport",
    "load_dataset",
    "evaluate",
    "normalize_class_name",
    "open_set_rule",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
TOP_K = 5  # the report's top-5; predictions are asked for this many guesses

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FILE_COLUMNS = ("file", "path", "filename", "filepath", "image")
NAME_COLUMNS = ("species", "name", "label", "class", "class_name", "animal")
INDEX_COLUMN = "class_index"
LABELS_CSV = "labels.csv"


class DatasetError(ValueError):
    """A dataset that cannot be read: no such folder, a CSV without the columns needed, no images..."""


def normalize_class_name(name: str) -> str:
    """The key class names are matched by: ``Blue_Jay``, ``blue-jay`` and ``Blue  jay`` are one class."""
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


# --------------------------------------------------------------------------------------------- datasets


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images and their classes: ``names[i]`` and/or ``indices[i]`` (None where the source has none)."""

    items: tuple[Any, ...]
    names: tuple[str | None, ...]
    indices: tuple[int | None, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not (len(self.items) == len(self.names) == len(self.indices)):
            raise DatasetError("Dataset: items, names and indices must have one entry per image")
        if not self.items:
            raise DatasetError(f"{self.source or 'dataset'}: no images")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_names(self) -> bool:
        return all(name is not None for name in self.names)

    @property
    def has_indices(self) -> bool:
        return all(index is not None for index in self.indices)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[Any, str | int]], *, source: str = "") -> Dataset:
        """``[(image, "red fox"), ...]`` (class names) or ``[(image, 277), ...]`` (class indices)."""
        items, names, indices = [], [], []
        for item, label in pairs:
            items.append(item)
            is_index = isinstance(label, int) and not isinstance(label, bool)
            names.append(None if is_index else str(label))
            indices.append(label if is_index else None)
        return cls(tuple(items), tuple(names), tuple(indices), source)


def load_dataset(path: str | os.PathLike, *, label_column: str | None = None) -> Dataset:
    """A labels CSV, or a folder: one subfolder per class (images anywhere below it), or a folder holding a
    ``labels.csv``, which is then read instead.

    The CSV has a file column (``file``, ``path``, ``filename``, ``filepath`` or ``image``; relative paths
    are relative to the CSV's folder) and a class: a name column (``label_column``, else the first of
    ``species``, ``name``, ``label``, ``class``, ``class_name``, ``animal``) and/or ``class_index``.
    """
    path = Path(path)
    if path.is_dir():
        if (path / LABELS_CSV).is_file():
            return _read_csv(path / LABELS_CSV, label_column)
        return _read_tree(path)
    if path.is_file():
        return _read_csv(path, label_column)
    raise DatasetError(f"{path}: no such dataset (a folder of class folders, or a labels CSV)")


def _read_tree(root: Path) -> Dataset:
    items, names = [], []
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in classes:
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                items.append(str(f))
                names.append(folder.name)
    if not items:
        raise DatasetError(f"{root}: no images in class subfolders (expected {root}/<class>/<image>)")
    return Dataset(tuple(items), tuple(names), (None,) * len(items), str(root))


def _read_csv(path: Path, label_column: str | None) -> Dataset:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable CSV: {e}") from None
    columns = {name.strip().casefold(): name for name in header if name}
    file_column = next((columns[c] for c in FILE_COLUMNS if c in columns), None)
    if file_column is None:
        raise DatasetError(f"{path}: no file column (one of {', '.join(FILE_COLUMNS)}); columns: {header}")
    if label_column is not None:
        if label_column not in header:
            raise DatasetError(f"{path}: no column {label_column!r}; columns: {header}")
        name_column = label_column
    else:
        name_column = next((columns[c] for c in NAME_COLUMNS if c in columns), None)
    index_column = columns.get(INDEX_COLUMN)
    if name_column is None and index_column is None:
        raise DatasetError(f"{path}: no class column (a name: one of {', '.join(NAME_COLUMNS)}, or "
                           f"{INDEX_COLUMN}); columns: {header}")
    items, names, indices = [], [], []
    for line, row in enumerate(rows, start=2):
        file = (row.get(file_column) or "").strip()
        if not file:
            raise DatasetError(f"{path} line {line}: empty {file_column!r}")
        items.append(str(path.parent / file))
        name = (row.get(name_column) or "").strip() if name_column else ""
        if name_column and not name:
            raise DatasetError(f"{path} line {line}: empty {name_column!r}")
        names.append(name or None)
        if index_column:
            text = (row.get(index_column) or "").strip()
            if not (text.isascii() and text.isdecimal() and len(text) <= 12):
                raise DatasetError(f"{path} line {line}: {index_column} must be an integer >= 0, got {text[:40]!r}")
            indices.append(int(text))
        else:
            indices.append(None)
    if not items:
        raise DatasetError(f"{path}: no rows")
    return Dataset(tuple(items), tuple(names), tuple(indices), str(path))


# --------------------------------------------------------------------------------------------- the model side


def open_set_rule(classifier: Any) -> tuple[str, float] | None:
    """The model's unknown rule as ``(method, threshold)``, or None when it has none (or does not say).

    Other predictors may state theirs as an ``unknown_rule`` attribute (an UnknownRule or a pair)."""
    rule = getattr(classifier, "unknown_rule", None)
    if rule is not None:
        method, threshold = (rule.method, rule.threshold) if hasattr(rule, "method") else rule
        return str(method), float(threshold)
    # A Classifier keeps it in its post-processing, swapped together with the model by reload().
    post = getattr(getattr(classifier, "_engine", None), "post", None)
    method = getattr(post, "unknown_method", None)
    return None if method is None else (method, float(post.unknown_threshold))


def _output_indices(classifier: Any) -> list[int] | None:
    """The model output index of each reported class, in ``classifier.labels`` order, where it tells."""
    indices = getattr(classifier, "output_indices", None)
    if indices is None:
        indices = getattr(getattr(classifier, "_engine", None), "output_indices", None)
    return None if indices is None else [int(i) for i in indices]


def _auto_match(data: Dataset, labels: Sequence[str], indices: Sequence[int] | None) -> Literal["name", "index"]:
    """By index when the dataset's class_index is the model's label space, else by name.

    It is taken to be when, of the dataset classes whose index the model has, at least half carry the
    model's name for that index: ImageNet photos with their class_index against an ImageNet model (or one
    keeping a subset of its outputs, whose names may be reworded), but not a dataset numbered 0..N-1 in its
    own order, whose index 0 is some other class than the model's.
    """
    if not data.has_indices:
        return "name"
    if not data.has_names or indices is None:
        return "index" if not data.has_names else "name"
    model_names = {int(i): normalize_class_name(name) for name, i in zip(labels, indices)}
    pairs = {(index, normalize_class_name(name)) for index, name in zip(data.indices, data.names)}  # type: ignore[arg-type]
    shared = [(index, name) for index, name in pairs if index in model_names]
    agreeing = sum(model_names[index] == name for index, name in shared)
    return "index" if shared and 2 * agreeing >= len(shared) else "name"


def _predictions(model: Any, items: Sequence[Any], *, batch_size: int | None, progress: bool) -> Iterator[Any]:
    if hasattr(model, "predict_iter"):
        kwargs = {} if batch_size is None else {"batch_size": batch_size}
        yield from model.predict_iter(items, top_k=TOP_K, progress=progress, **kwargs)
        return
    step = batch_size or 64
    predict = model.predict_batch if hasattr(model, "predict_batch") else model
    if not callable(predict):
        raise TypeError(f"evaluate needs a Classifier, a model reference or a predictor, got {type(model).__name__}")
    for start in range(0, len(items), step):
        chunk = list(items[start:start + step])
        answers = list(predict(chunk, top_k=TOP_K) if predict is not model else predict(chunk))
        if len(answers) != len(chunk):
            raise ValueError(f"the predictor answered {len(answers)} predictions for {len(chunk)} images")
        yield from answers


# --------------------------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class ClassFigures:
    """One dataset class the model has. ``precision`` counts every image the model labelled so (other
    classes' and other-class images too); ``recall`` counts an "unknown" answer as a miss."""

    name: str
    support: int  # images of this class
    predicted: int  # images the model labelled as this class
    correct: int
    precision: float | None  # correct / predicted (None when never predicted)
    recall: float | None  # correct / support


@dataclasses.dataclass(frozen=True)
class ThresholdPoint:
    """What an open-set threshold ``t`` would do: images whose open-set score is below ``t`` are "unknown"."""

    threshold: float
    coverage: float  # images answered (score >= t), of all evaluated
    accuracy: float | None  # answers that are right (an other-class image answered is wrong), None if none
    known_answered: float | None  # images of the model's classes answered, of those images
    other_rejected: float | None  # other-class images said unknown, of those images


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    model: str
    dataset: str
    match: Literal["name", "index"]
    images: int  # in the dataset
    evaluated: int  # classified (images that failed are in ``errors``)
    known: int  # evaluated images of classes the model has
    other: int  # evaluated images of classes it does not have
    top1: float | None  # known images whose reported label is right (an unknown answer is wrong)
    top1_guess: float | None  # known images whose best guess is right, whatever the open-set rule said
    top5: float | None  # known images whose class is among the 5 best guesses
    unknown_rate: float | None  # evaluated images answered "unknown"
    unknown_rate_known: float | None
    unknown_rate_other: float | None  # the right answer for these: the higher the better
    open_set_accuracy: float | None  # right label for known images, "unknown" for other-class ones
    rule: tuple[str, float] | None  # the model's own unknown rule (method, threshold)
    classes: tuple[ClassFigures, ...]
    sweep: tuple[ThresholdPoint, ...]
    errors: tuple[dict, ...]  # {"file", "code", "message"} of each image that could not be classified
    unmatched_classes: tuple[str, ...]  # dataset classes the model does not have

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["rule"] = None if self.rule is None else {"method": self.rule[0], "threshold": self.rule[1]}
        return data

    def format(self, *, per_class: int | None = 20) -> str:
        """The report as text; ``per_class`` classes are listed (worst recall first), None for all."""
        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        lines = [
            f"model        {self.model}",
            f"dataset      {self.dataset} (matched by {'class name' if self.match == 'name' else 'class_index'})",
            f"images       {self.images}: {self.evaluated} classified, {len(self.errors)} failed; "
            f"{self.known} of the model's classes, {self.other} of other classes",
            f"top-1        {num(self.top1)}  (the reported label; an unknown answer counts as wrong)",
            f"top-1 guess  {num(self.top1_guess)}  (the best guess, whatever the open-set rule said)",
            f"top-5        {num(self.top5)}",
            f"unknown      {num(self.unknown_rate)} of all images, {num(self.unknown_rate_known)} of the model's "
            f"classes, {num(self.unknown_rate_other)} of other classes",
            f"open-set     {num(self.open_set_accuracy)}  (right label, or unknown for other classes)",
        ]
        if self.unmatched_classes:
            shown = ", ".join(self.unmatched_classes[:8]) + (", ..." if len(self.unmatched_classes) > 8 else "")
            lines.append(f"other        {len(self.unmatched_classes)} dataset classes the model does not have: {shown}")
        rule = "none" if self.rule is None else f"unknown when {self.rule[0]} < {self.rule[1]:g}"
        lines += ["", f"open-set threshold sweep (the model's rule: {rule})",
                  "threshold  coverage  accuracy  known answered  other rejected"]
        for point in self.sweep:
            mark = "  <- the model's" if self.rule is not None and math.isclose(point.threshold, self.rule[1]) else ""
            lines.append(f"{point.threshold:>9.3f}  {num(point.coverage):>8}  {num(point.accuracy):>8}  "
                         f"{num(point.known_answered):>14}  {num(point.other_rejected):>14}{mark}")
        ranked = sorted(self.classes,
                        key=lambda c: (c.recall if c.recall is not None else 2.0, -c.support, c.name.casefold()))
        shown_classes = ranked if per_class is None else ranked[:per_class]
        if shown_classes:
            width = max(len("class"), *(len(c.name) for c in shown_classes))
            title = "per class" + ("" if len(shown_classes) == len(ranked) else
                                   f" ({len(shown_classes)} of {len(ranked)}, worst recall first; all in --json)")
            lines += ["", title, f"{'class':<{width}}  support  predicted  precision  recall"]
            lines += [f"{c.name:<{width}}  {c.support:>7}  {c.predicted:>9}  {num(c.precision):>9}  {num(c.recall):>6}"
                      for c in shown_classes]
        if self.errors:
            lines += ["", f"{len(self.errors)} images could not be classified, e.g. "
                          f"{self.errors[0]['file']}: {self.errors[0]['message']}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(model: Any, dataset: Dataset | str | os.PathLike, *, match: Literal["auto", "name", "index"] = "auto",
             thresholds: Sequence[float] | None = None, labels: Sequence[str] | None = None,
             output_indices: Sequence[int] | None = None, batch_size: int | None = None, progress: bool = False,
             label_column: str | None = None) -> EvaluationReport:
    """Classify every image of ``dataset`` with ``model`` and measure the answers; see the module docstring.

    ``model``: a Classifier, a model reference (loaded and closed here), or a predictor (``predict_iter`` or
    ``predict_batch``, or a callable ``images -> predictions``) with ``labels`` (or pass ``labels=``).
    ``match="index"`` needs the model's output index of each class: a Classifier tells, other predictors
    take ``output_indices=``. ``thresholds`` default to :data:`DEFAULT_THRESHOLDS`.
    """
    if isinstance(model, (str, os.PathLike)):
        from .model.classifier import Classifier

        with Classifier.load(model, batch_size=batch_size or 64) as classifier:
            return evaluate(classifier, dataset, match=match, thresholds=thresholds, progress=progress,
                            label_column=label_column)
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, label_column=label_column)
    thresholds = tuple(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds must be numbers in [0, 1], got {t!r}")
    model_labels = list(labels if labels is not None else getattr(model, "labels", None) or [])
    if not model_labels:
        raise ValueError("evaluate: the model's class names are needed (a Classifier has them; else pass labels=)")
    if match not in ("auto", "name", "index"):
        raise ValueError(f"match must be 'auto', 'name' or 'index', got {match!r}")
    if match == "auto":
        match = _auto_match(data, model_labels, output_indices if output_indices is not None else _output_indices(model))
    if match == "name" and not data.has_names:
        raise DatasetError(f"{data.source}: match='name' needs a class name for every image")
    if match == "index" and not data.has_indices:
        raise DatasetError(f"{data.source}: match='index' needs a class_index for every image")

    # Each image's class as a key, and how a prediction is read as a key, under the matching chosen.
    if match == "name":
        truths: list[Any] = [normalize_class_name(n) for n in data.names]  # type: ignore[arg-type]
        known_keys = {normalize_class_name(label) for label in model_labels}
        display = {}
        for name, key in zip(data.names, truths):
            display.setdefault(key, name)

        def key_of_label(name: str | None, index: int | None) -> Any:
            return None if name is None else normalize_class_name(name)

        def keys_of_guesses(top: list[tuple[str, float]]) -> set:
            return {normalize_class_name(name) for name, _ in top}
    else:
        indices = list(output_indices) if output_indices is not None else _output_indices(model)
        if indices is None or len(indices) != len(model_labels):
            raise ValueError("match='index' needs the model output index of each class (pass output_indices=)")
        truths = list(data.indices)
        known_keys = set(indices)
        by_name: dict[str, set[int]] = {}
        for name, index in zip(model_labels, indices):
            by_name.setdefault(name, set()).add(index)
        display = {}
        for name, key in zip(data.names, truths):
            display.setdefault(key, name if name is not None else str(key))

        def key_of_label(name: str | None, index: int | None) -> Any:
            return None if name is None else index

        def keys_of_guesses(top: list[tuple[str, float]]) -> set:
            # top_k names its guesses; a name two classes share (ImageNet's two "crane"s) credits both.
            return set().union(*(by_name.get(name, set()) for name, _ in top)) if top else set()

    support: dict[Any, int] = {}
    predicted: dict[Any, int] = {}
    correct: dict[Any, int] = {}
    scored: list[tuple[float, bool, bool]] = []  # (open-set score, of a known class, guess right)
    errors: list[dict] = []
    known = other = top1 = top1_guess = top5 = unknown_known = unknown_other = 0
    for i, p in enumerate(_predictions(model, data.items, batch_size=batch_size, progress=progress)):
        if i >= len(data):
            raise ValueError("the predictor answered more predictions than there are images")
        if p.error is not None:
            body = p.to_dict().get("error") or {}
            errors.append({"file": str(data.items[i]), "code": body.get("code") or body.get("type") or "",
                           "message": body.get("message", str(p.error))})
            continue
        truth = truths[i]
        is_known = truth in known_keys
        reported = key_of_label(p.label, p.index) if not p.unknown else None
        guessed = key_of_label(p.guess, p.index)
        if reported is not None:
            predicted[reported] = predicted.get(reported, 0) + 1
        if is_known:
            known += 1
            support[truth] = support.get(truth, 0) + 1
            if reported == truth:
                top1 += 1
                correct[truth] = correct.get(truth, 0) + 1
            top1_guess += guessed == truth
            top5 += truth in keys_of_guesses(list(p.top_k)[:TOP_K])
            unknown_known += bool(p.unknown)
        else:
            other += 1
            unknown_other += bool(p.unknown)
        score = p.open_set_score if p.open_set_score is not None else p.score
        scored.append((float(score) if score is not None else 0.0, is_known, is_known and guessed == truth))
    evaluated = known + other

    sweep = []
    for t in thresholds:
        answered = [s for s in scored if s[0] >= t]
        right = sum(1 for s in answered if s[2])
        known_answered = sum(1 for s in answered if s[1])
        other_answered = len(answered) - known_answered
        sweep.append(ThresholdPoint(float(t), _ratio(len(answered), evaluated) or 0.0, _ratio(right, len(answered)),
                                    _ratio(known_answered, known), _ratio(other - other_answered, other)))
    classes = tuple(
        ClassFigures(str(display[key]), support[key], predicted.get(key, 0), correct.get(key, 0),
                     _ratio(correct.get(key, 0), predicted.get(key, 0)), _ratio(correct.get(key, 0), support[key]))
        for key in sorted(support, key=lambda k: (str(display[k]).casefold(), str(display[k])))
    )
    unmatched = tuple(sorted({str(display[key]) for key in truths if key not in known_keys}))
    return EvaluationReport(
        model=str(getattr(model, "model", "") or type(model).__name__),
        dataset=data.source,
        match=match,  # type: ignore[arg-type]
        images=len(data),
        evaluated=evaluated,
        known=known,
        other=other,
        top1=_ratio(top1, known),
        top1_guess=_ratio(top1_guess, known),
        top5=_ratio(top5, known),
        unknown_rate=_ratio(unknown_known + unknown_other, evaluated),
        unknown_rate_known=_ratio(unknown_known, known),
        unknown_rate_other=_ratio(unknown_other, other),
        open_set_accuracy=_ratio(top1 + unknown_other, evaluated),
        rule=open_set_rule(model),
        classes=classes,
        sweep=tuple(sweep),
        errors=tuple(errors),
        unmatched_classes=unmatched,
    )
