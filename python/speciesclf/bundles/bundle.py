"""Model bundles: a model file, its labels and a manifest that says how to use them.

A bundle is a directory (or a ``.zip`` of one) holding::

    manifest.json   what the model is, how to feed it (PreprocessSpec) and how to read its outputs
    model.<suffix>  the model file itself (ONNX, TorchScript or torch.export), never parsed here
    labels.tsv      UTF-8, header ``index<TAB>name<TAB>scientific_name`` (third column optional)

:func:`create_bundle` writes one, :meth:`Bundle.open` reads and checks one. Every field is validated by
:meth:`Manifest.from_dict`; a :class:`BundleError` names the field (``manifest.version``) and what was
expected, so a bad bundle is rejected when it is made, not when a request reaches it.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import math
import operator
import os
import re
import shutil
import stat
import tempfile
import weakref
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..preprocessing.spec import PreprocessSpec

__all__ = [
    "SCHEMA_VERSION",
    "BundleError",
    "Label",
    "UnknownRule",
    "Manifest",
    "Bundle",
    "ModelCheck",
    "create_bundle",
    "read_labels",
    "write_labels",
]

SCHEMA_VERSION = 1

MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.tsv"
LABELS_HEADER = ("index", "name", "scientific_name")

FRAMEWORKS = ("onnx", "torchscript", "torch-export")
OUTPUT_KINDS = ("logits", "probabilities")
UNKNOWN_METHODS = ("subset_mass", "max_probability")
LINEAGE_KEYS = ("parent_version", "training_data")
_SUFFIX_FRAMEWORK = {".onnx": "onnx", ".pt": "torchscript", ".pt2": "torch-export"}

# Zip extraction limits: a bundle is a handful of files, the largest a model of at most a few GiB.
MAX_ZIP_UNCOMPRESSED = 2 * 2**30
MAX_ZIP_ENTRIES = 10_000
# Model outputs (and so label and subset indices): far above any classifier's class count, low enough
# that checks over 0..num_outputs-1 stay cheap and a typo (or a hostile manifest) cannot ask for 10**12.
MAX_NUM_OUTPUTS = 2**24

# Patterns are applied with fullmatch: `$` would also match before a trailing "\n".
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# The regular expression suggested by semver.org (2.0.0), anchored by fullmatch.
_SEMVER_RE = re.compile(
    r"(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<prerelease>(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+(?P<build>[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?",
    re.ASCII,
)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle or manifest that is invalid. The message names the field and what was expected."""


# --------------------------------------------------------------------------------------------- helpers


def is_semver(version: object) -> bool:
    return isinstance(version, str) and _SEMVER_RE.fullmatch(version) is not None


def semver_key(version: str) -> tuple:
    """Sort key giving semver 2.0 precedence (prerelease < release; build metadata breaks ties only)."""
    m = _SEMVER_RE.fullmatch(version)
    if m is None:
        raise ValueError(f"not a semantic version: {version!r}")
    core = (int(m["major"]), int(m["minor"]), int(m["patch"]))
    if m["prerelease"] is None:
        pre: tuple = (1,)  # a release sorts after every prerelease of the same core
    else:
        parts = []
        for ident in m["prerelease"].split("."):
            # numeric identifiers sort numerically and before alphanumeric ones
            parts.append((0, int(ident), "") if ident.isdigit() else (1, 0, ident))
        pre = (0, tuple(parts))
    return (core, pre, m["build"] or "")


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def _describe(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (over 4300 digits): say how long instead
        digits = int(value.bit_length() * 0.30103) if isinstance(value, int) else 0
        text = f"<an integer of about {digits} digits>" if digits else "?"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _fail(field: str, expected: str, value: object) -> BundleError:
    return BundleError(f"manifest.{field}: expected {expected}, got {_describe(value)}")


def _check_relpath(field: str, value: object) -> str:
    expected = "a relative POSIX path inside the bundle (no '..', not absolute)"
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        raise _fail(field, expected, value)
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", value) or str(p) in ("", "."):
        raise _fail(field, expected, value)
    if p.name in (MANIFEST_FILE,) and len(p.parts) == 1:
        raise _fail(field, f"a path other than {MANIFEST_FILE!r}", value)
    return str(p)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_index(value: object) -> int | None:
    """``value`` as a plain int when it is an integer (numpy integers included, bools not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _one_line(text: str) -> str:
    """A runtime's multi-line message as one line (onnxruntime lists each bad dimension on its own)."""
    return re.sub(r"\s*\n\s*", "; ", re.sub(r":\s*\n\s*", ": ", text.strip()))


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- labels


@dataclasses.dataclass(frozen=True)
class Label:
    """One class: the model output ``index``, a display ``name`` and an optional ``scientific_name``."""

    index: int
    name: str
    scientific_name: str | None = None

    def __post_init__(self) -> None:
        index = _as_index(self.index)
        if index is None or not 0 <= index < MAX_NUM_OUTPUTS:
            raise BundleError(f"labels: index must be an int in 0..{MAX_NUM_OUTPUTS - 1}, got {_describe(self.index)}")
        object.__setattr__(self, "index", index)
        for field, value, optional in (("name", self.name, False), ("scientific_name", self.scientific_name, True)):
            if value is None and optional:
                continue
            if not isinstance(value, str):
                raise BundleError(f"labels: {field} of index {self.index} must be a string, got {_describe(value)}")
            if any(c in value for c in "\t\r\n\x00"):
                raise BundleError(f"labels: {field} of index {self.index} must not contain tabs or line breaks")
            if value != value.strip() or (not value and not optional):
                raise BundleError(
                    f"labels: {field} of index {self.index} must be non-empty without surrounding spaces, "
                    f"got {value!r}"
                )
        if self.scientific_name == "":
            object.__setattr__(self, "scientific_name", None)


def read_labels(path: str | Path) -> list[Label]:
    """Read a labels TSV (UTF-8, optional BOM) in file order. Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise BundleError(f"{path.name}: labels file not found ({path})") from None
    except UnicodeDecodeError as e:
        raise BundleError(f"{path.name}: not valid UTF-8 ({e})") from None
    # Rows end at "\n" only (a "\r" before it is dropped): str.splitlines() would also split names at
    # \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029, which Label allows and write_labels writes as they are.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if not lines or tuple(lines[0].split("\t")) not in (LABELS_HEADER, LABELS_HEADER[:2]):
        first = lines[0] if lines else ""
        raise BundleError(
            f"{path.name} line 1: expected the header 'index\\tname\\tscientific_name', got {first!r}"
        )
    labels: list[Label] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) not in (2, 3):
            raise BundleError(f"{path.name} line {lineno}: expected 2 or 3 tab-separated columns, got {len(cols)}")
        index_text = cols[0].strip()
        # The length check keeps int() away from thousands of digits (a ValueError beyond 4300 of them).
        if not index_text.isdecimal() or not index_text.isascii() or len(index_text) > 12:
            raise BundleError(
                f"{path.name} line {lineno}: index must be an integer in 0..{MAX_NUM_OUTPUTS - 1}, got {cols[0][:40]!r}"
            )
        try:
            labels.append(Label(int(index_text), cols[1].strip(), (cols[2].strip() or None) if len(cols) == 3 else None))
        except BundleError as e:
            raise BundleError(f"{path.name} line {lineno}: {e}") from None
    if not labels:
        raise BundleError(f"{path.name}: no label rows")
    return labels


def write_labels(path: str | Path, labels: Sequence[Label]) -> None:
    """Write labels as UTF-8 TSV with the ``index\\tname\\tscientific_name`` header."""
    rows = ["\t".join(LABELS_HEADER)]
    for label in labels:
        if not isinstance(label, Label):
            raise BundleError(f"labels: expected Label objects, got {_describe(label)}")
        rows.append(f"{label.index}\t{label.name}\t{label.scientific_name or ''}")
    Path(path).write_text("\n".join(rows) + "\n", encoding="utf-8", newline="\n")


# --------------------------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class UnknownRule:
    """When to answer "unknown": the kept subset's probability mass, or the top probability, below ``threshold``."""

    method: Literal["subset_mass", "max_probability"]
    threshold: float

    def __post_init__(self) -> None:
        if self.method not in UNKNOWN_METHODS:
            raise _fail("unknown.method", f"one of {list(UNKNOWN_METHODS)}", self.method)
        if not _is_number(self.threshold) or not 0.0 < float(self.threshold) < 1.0:
            raise _fail("unknown.threshold", "a number with 0 < threshold < 1", self.threshold)
        object.__setattr__(self, "threshold", float(self.threshold))

    def to_dict(self) -> dict:
        return {"method": self.method, "threshold": self.threshold}


_REQUIRED = ("name", "version", "framework", "model_file", "model_sha256", "labels_file", "preprocess")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything needed to use a model file correctly. Validated on construction."""

    name: str
    version: str
    framework: str  # "onnx", "torchscript", "torch-export", or a speciesclf.loaders plugin's name
    model_file: str
    model_sha256: str
    labels_file: str
    preprocess: PreprocessSpec
    output_kind: Literal["logits", "probabilities"] = "logits"
    num_outputs: int | None = None
    label_subset: tuple[int, ...] | None = None
    unknown: UnknownRule | None = None
    temperature: float = 1.0
    # The model output holding its penultimate pooled features (Prediction.embedding), if it has one.
    embedding_output: str | None = None
    # Dicts are left out of the hash so that a Manifest stays hashable; they still take part in ==.
    metrics: dict[str, float] = dataclasses.field(default_factory=dict, hash=False)
    lineage: dict[str, str | None] = dataclasses.field(default_factory=dict, hash=False)
    notes: str = ""
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:  # noqa: C901 - one check per field, in field order
        def put(field: str, value: object) -> None:
            object.__setattr__(self, field, value)

        if isinstance(self.schema_version, bool) or not isinstance(self.schema_version, int):
            raise _fail("schema_version", f"the integer {SCHEMA_VERSION}", self.schema_version)
        if self.schema_version != SCHEMA_VERSION:
            newer = " (written by a newer speciesclf?)" if self.schema_version > SCHEMA_VERSION else ""
            raise _fail("schema_version", f"{SCHEMA_VERSION}{newer}", self.schema_version)
        if not is_valid_name(self.name):
            raise _fail("name", "a name matching ^[a-z0-9][a-z0-9._-]{0,63}$", self.name)
        if not is_semver(self.version):
            raise _fail("version", "a semantic version MAJOR.MINOR.PATCH[-prerelease][+build]", self.version)
        # Other formats come from speciesclf.loaders plugins, named like bundles; whether one is installed is
        # a question for load time, not for reading the manifest.
        if self.framework not in FRAMEWORKS and not is_valid_name(self.framework):
            raise _fail("framework", f"one of {list(FRAMEWORKS)} or a speciesclf.loaders plugin's name",
                        self.framework)
        put("model_file", _check_relpath("model_file", self.model_file))
        if not isinstance(self.model_sha256, str) or not _SHA256_RE.fullmatch(self.model_sha256):
            raise _fail("model_sha256", "64 lowercase hex digits", self.model_sha256)
        put("labels_file", _check_relpath("labels_file", self.labels_file))
        if self.labels_file == self.model_file:
            raise _fail("labels_file", "a file other than manifest.model_file", self.labels_file)
        if not isinstance(self.preprocess, PreprocessSpec):
            raise _fail("preprocess", "a PreprocessSpec", self.preprocess)
        if self.output_kind not in OUTPUT_KINDS:
            raise _fail("output_kind", f"one of {list(OUTPUT_KINDS)}", self.output_kind)
        if self.num_outputs is not None:
            count = _as_index(self.num_outputs)
            if count is None or not 0 < count <= MAX_NUM_OUTPUTS:
                raise _fail("num_outputs", f"an integer in 1..{MAX_NUM_OUTPUTS} or null", self.num_outputs)
            put("num_outputs", count)
        if self.label_subset is not None:
            subset = self.label_subset
            if isinstance(subset, (str, bytes, dict)) or not hasattr(subset, "__iter__"):
                raise _fail("label_subset", "a non-empty list of output indices or null", subset)
            subset = list(subset)
            if not subset:
                raise _fail("label_subset", "a non-empty list of output indices or null", subset)
            for pos, raw in enumerate(subset):
                i = _as_index(raw)
                if i is None or not 0 <= i < MAX_NUM_OUTPUTS:
                    raise _fail("label_subset", f"output indices (integers in 0..{MAX_NUM_OUTPUTS - 1})", raw)
                subset[pos] = i
                if self.num_outputs is not None and i >= self.num_outputs:
                    raise _fail("label_subset", f"indices < manifest.num_outputs ({self.num_outputs})", i)
            if len(set(subset)) != len(subset):
                counts = collections.Counter(subset)
                dupes = sorted(i for i, n in counts.items() if n > 1)
                raise _fail("label_subset", "unique indices", f"duplicates {dupes}")
            put("label_subset", tuple(subset))
        if self.unknown is not None:
            if not isinstance(self.unknown, UnknownRule):
                raise _fail("unknown", "an UnknownRule or null", self.unknown)
            if self.unknown.method == "subset_mass" and self.label_subset is None:
                raise BundleError(
                    "manifest.unknown.method: 'subset_mass' requires manifest.label_subset (the kept outputs "
                    "whose probability mass is measured); use 'max_probability' without a subset"
                )
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise _fail("temperature", "a finite number > 0", self.temperature)
        put("temperature", float(self.temperature))
        if self.embedding_output is not None and not (
                isinstance(self.embedding_output, str) and 0 < len(self.embedding_output) <= 256
                and self.embedding_output.isprintable()):
            raise _fail("embedding_output", "the name of one of the model's outputs (a string) or null",
                        self.embedding_output)
        if not isinstance(self.metrics, dict):
            raise _fail("metrics", "an object of metric name -> number", self.metrics)
        metrics = {}
        for key, value in self.metrics.items():
            if not isinstance(key, str) or not key:
                raise _fail("metrics", "non-empty string keys", key)
            if not _is_number(value) or not math.isfinite(value):
                raise _fail(f"metrics.{key}", "a finite number", value)
            metrics[key] = float(value)
        put("metrics", metrics)
        if not isinstance(self.lineage, dict):
            raise _fail("lineage", f"an object with keys {list(LINEAGE_KEYS)}", self.lineage)
        for key, value in self.lineage.items():
            if key not in LINEAGE_KEYS:
                raise _fail("lineage", f"only the keys {list(LINEAGE_KEYS)}", key)
            if value is not None and not isinstance(value, str):
                raise _fail(f"lineage.{key}", "a string or null", value)
        put("lineage", dict(self.lineage))
        if not isinstance(self.notes, str):
            raise _fail("notes", "a string", self.notes)
        if not isinstance(self.created_at, str):
            raise _fail("created_at", "an ISO 8601 UTC timestamp string", self.created_at)
        if self.created_at:
            try:
                when = _dt.datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))
            except ValueError:
                when = None
            if when is None or when.utcoffset() != _dt.timedelta(0):
                raise _fail("created_at", "an ISO 8601 UTC timestamp like '2024-05-01T12:00:00Z'", self.created_at)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists, not tuples); ``Manifest.from_dict(m.to_dict()) == m``."""
        spec = self.preprocess.to_dict()
        for key, value in spec.items():
            if isinstance(value, tuple):
                spec[key] = list(value)
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "framework": self.framework,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "labels_file": self.labels_file,
            "preprocess": spec,
            "output_kind": self.output_kind,
            "num_outputs": self.num_outputs,
            "label_subset": None if self.label_subset is None else list(self.label_subset),
            "unknown": None if self.unknown is None else self.unknown.to_dict(),
            "temperature": self.temperature,
            # Written only when set: manifests of models without one read as before.
            **({} if self.embedding_output is None else {"embedding_output": self.embedding_output}),
            "metrics": dict(self.metrics),
            "lineage": dict(self.lineage),
            "notes": self.notes,
            "created_at": self.created_at,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Validate a parsed manifest.json. Unknown keys, missing keys and bad values raise BundleError."""
        if not isinstance(data, dict):
            raise BundleError(f"manifest: expected a JSON object, got {type(data).__name__}")
        values: dict[str, Any] = dict(data)
        # The schema version first: a newer schema is expected to have keys this version does not know.
        if "schema_version" in values:
            version = values["schema_version"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise _fail("schema_version", f"the integer {SCHEMA_VERSION}", version)
            if version != SCHEMA_VERSION:
                newer = " (written by a newer speciesclf?)" if version > SCHEMA_VERSION else ""
                raise _fail("schema_version", f"{SCHEMA_VERSION}{newer}", version)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise BundleError(f"manifest: unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise BundleError(f"manifest.{missing[0]}: missing (required fields: {list(_REQUIRED)})")

        pre = values["preprocess"]
        if not isinstance(pre, dict):
            raise _fail("preprocess", "an object of PreprocessSpec fields", pre)
        try:
            values["preprocess"] = PreprocessSpec.from_dict(pre)
        except (TypeError, ValueError) as e:
            raise BundleError(f"manifest.preprocess: {e}") from None

        rule = values.get("unknown")
        if rule is not None:
            if not isinstance(rule, dict):
                raise _fail("unknown", "an object {method, threshold} or null", rule)
            extra = sorted(set(rule) - {"method", "threshold"})
            if extra:
                raise BundleError(f"manifest.unknown: unknown field(s) {extra}; expected 'method' and 'threshold'")
            for key in ("method", "threshold"):
                if key not in rule:
                    raise BundleError(f"manifest.unknown.{key}: missing")
            values["unknown"] = UnknownRule(rule["method"], rule["threshold"])

        subset = values.get("label_subset")
        if subset is not None and not isinstance(subset, list | tuple):
            raise _fail("label_subset", "a list of output indices or null", subset)
        if subset is not None:
            values["label_subset"] = tuple(subset)
        for key in ("metrics", "lineage"):
            if key in values and values[key] is None:
                values[key] = {}
        return cls(**values)


def check_labels(manifest: Manifest, labels: Sequence[Label]) -> None:
    """Cross-check labels against the manifest (unique indices, coverage, subset rows)."""
    if not labels:
        raise BundleError("labels: at least one label is needed")
    seen: set[int] = set()
    for label in labels:
        if label.index in seen:
            raise BundleError(f"labels: duplicate index {label.index}")
        seen.add(label.index)
        if manifest.num_outputs is not None and label.index >= manifest.num_outputs:
            raise BundleError(
                f"labels: index {label.index} is out of range for manifest.num_outputs ({manifest.num_outputs})"
            )
    if manifest.label_subset is not None:
        missing = [i for i in manifest.label_subset if i not in seen]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise BundleError(f"manifest.label_subset: output indices without a label row: {shown}")
    # Every index is unique and < num_outputs (above), so as many labels as outputs means all are covered:
    # no set(range(num_outputs)), whose size the manifest would choose.
    elif manifest.num_outputs is not None and len(seen) != manifest.num_outputs:
        missing = list(itertools.islice((i for i in range(manifest.num_outputs) if i not in seen), 11))
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise BundleError(
            f"labels: without manifest.label_subset the labels must cover 0..{manifest.num_outputs - 1} "
            f"(manifest.num_outputs); missing: {shown}"
        )


# --------------------------------------------------------------------------------------------- zip


def _zip_entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    name = info.filename
    if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"zip: unsafe entry {name!r} (absolute path)")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise BundleError(f"zip: unsafe entry {name!r} ('..' in path)")
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise BundleError(f"zip: entry {name!r} is a symlink; bundles hold regular files only")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise BundleError(f"zip: entry {name!r} is not a regular file")
    return parts


def _extract_zip(archive: Path, dest: Path) -> Path:
    """Safely extract ``archive`` into ``dest``; return the bundle root (``dest`` or its single top folder)."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"zip: cannot read {archive}: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise BundleError(f"zip: {len(infos)} entries, more than the {MAX_ZIP_ENTRIES} allowed")
        declared = sum(i.file_size for i in infos)
        if declared > MAX_ZIP_UNCOMPRESSED:
            raise BundleError(
                f"zip: {declared} bytes uncompressed, more than the {MAX_ZIP_UNCOMPRESSED} allowed (zip bomb?)"
            )
        seen: set[tuple[str, ...]] = set()
        plan = []
        for info in infos:
            parts = _zip_entry_parts(info)
            if not parts:
                continue
            if parts in seen:
                raise BundleError(f"zip: duplicate entry {info.filename!r}")
            seen.add(parts)
            plan.append((info, parts))
        total = 0
        for info, parts in plan:
            target = dest.joinpath(*parts)
            try:
                # Fails where an earlier entry made a file of a folder on this path ("a", then "a/b").
                (target if info.is_dir() else target.parent).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BundleError(f"zip: cannot extract {info.filename!r}: {e}") from None
            if info.is_dir():
                continue
            written = 0
            try:
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        total += len(chunk)
                        # The header sizes may lie: count what is actually inflated.
                        if written > info.file_size or total > MAX_ZIP_UNCOMPRESSED:
                            raise BundleError(f"zip: entry {info.filename!r} inflates past its declared size")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
                raise BundleError(f"zip: cannot extract {info.filename!r}: {e}") from None
    if (dest / MANIFEST_FILE).is_file():
        return dest
    top = [p for p in dest.iterdir()]
    if len(top) == 1 and top[0].is_dir() and (top[0] / MANIFEST_FILE).is_file():
        return top[0]
    raise BundleError(f"{MANIFEST_FILE}: not found in {archive} (at the top or in a single top folder)")


# --------------------------------------------------------------------------------------------- bundle


class Bundle:
    """An opened bundle: its manifest, labels and the path of its model file.

    A ``.zip`` is extracted to a private temporary directory (``path``) that lives as long as this
    object (or until :meth:`close`); keep the Bundle alive while its ``model_path`` is in use.
    """

    path: Path
    source: Path
    manifest: Manifest
    labels: list[Label]
    model_path: Path

    def __init__(self, path: Path, manifest: Manifest, labels: list[Label], *, source: Path | None = None) -> None:
        self.path = Path(path)
        self.source = Path(source) if source is not None else self.path
        self.manifest = manifest
        self.labels = list(labels)
        self.model_path = self.path / manifest.model_file
        self._cleanup: weakref.finalize | None = None

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """Open a bundle directory or ``.zip``; with ``verify`` the model's sha256 is checked."""
        source = Path(path)
        if source.is_dir():
            bundle = cls._open_dir(source, source=source)
        elif source.is_file():
            if not zipfile.is_zipfile(source):
                raise BundleError(f"{source}: neither a bundle directory nor a zip file")
            tmp = Path(tempfile.mkdtemp(prefix="speciesclf-bundle-"))
            try:
                root = _extract_zip(source, tmp)
                bundle = cls._open_dir(root, source=source)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            bundle._cleanup = weakref.finalize(bundle, shutil.rmtree, str(tmp), True)
        elif source.exists():
            raise BundleError(f"{source}: not a directory or a file")
        else:
            raise BundleError(f"{source}: no such bundle")
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def _open_dir(cls, root: Path, *, source: Path) -> Bundle:
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise BundleError(f"{MANIFEST_FILE}: not found in {root}")
        try:
            data = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{MANIFEST_FILE}: not valid UTF-8 JSON: {e}") from None
        except ValueError as e:  # an integer of more than 4300 digits (int()'s limit on str conversion)
            raise BundleError(f"{MANIFEST_FILE}: unusable JSON: {e}") from None
        except RecursionError:
            raise BundleError(f"{MANIFEST_FILE}: unusable JSON: nested too deeply") from None
        manifest = Manifest.from_dict(data)
        real_root = root.resolve()
        for field in ("model_file", "labels_file"):
            rel = getattr(manifest, field)
            target = root / rel
            if not target.is_file():
                raise BundleError(f"manifest.{field}: {rel!r} not found in the bundle ({root})")
            if not target.resolve().is_relative_to(real_root):
                raise BundleError(f"manifest.{field}: {rel!r} leads outside the bundle (symlink?)")
        labels = read_labels(root / manifest.labels_file)
        check_labels(manifest, labels)
        return cls(root, manifest, labels, source=source)

    def verify(self) -> None:
        """Check that the model file is there and its sha256 matches the manifest."""
        if not self.model_path.is_file():
            raise BundleError(f"manifest.model_file: {self.manifest.model_file!r} not found in {self.path}")
        self._check_sha256(_sha256_file(self.model_path))

    def check_model(self, *, device: str = "cpu") -> ModelCheck:
        """Load the model with its runtime and run one test image through it, as a Classifier would.

        :meth:`verify` only proves the file is the one the manifest names; this proves the file is a model
        that fits the manifest: the runtime parses it (onnxruntime builds a session, torch loads the
        archive); its declared input fits ``manifest.preprocess`` and its output width the labels,
        ``num_outputs`` and ``label_subset`` (``Classifier.load``'s own checks,
        :func:`speciesclf.model.classifier.check_model_io`); and a test image preprocessed as the manifest says
        runs through it and gives finite scores. Raises BundleError (its ModelInputError subclass for the
        input) naming what does not fit; the runtime's own error is the ``__cause__``.
        """
        import numpy as np

        from ..model.classifier import Classifier
        from ..model.runtimes import ModelLoadError

        spec = self.manifest.preprocess
        try:
            classifier = Classifier.load(self, device=device, batch_size=1)
        except ModelLoadError as e:
            raise BundleError(f"{self.ref}: {e}") from e
        with classifier:
            probe = np.full((max(spec.size, 8), max(spec.size, 8), 3), 128, dtype=np.uint8)
            shape = "x".join(map(str, spec.output_shape(1)))
            try:
                prediction = classifier.predict(probe, return_logits=True)
            except BundleError:
                raise  # an output width known only after a run (torch): already names the field
            except Exception as e:  # the runtime's own error type: onnxruntime's InvalidArgument, torch's...
                raise BundleError(
                    f"{self.ref}: the model refuses a test image preprocessed as manifest.preprocess says "
                    f"({shape} {spec.dtype} {spec.layout}, size {spec.size}): {_one_line(str(e))}"
                ) from e
            if prediction.error is not None:
                raise BundleError(f"{self.ref}: a test image: {prediction.error}") from prediction.error
            outputs = None if prediction.logits is None else int(np.size(prediction.logits))
            # The runtime load_runtime picks for the framework (backend "auto"): a plugin goes by its own name.
            framework = self.manifest.framework
            runtime = {"onnx": "onnxruntime", "torchscript": "torch", "torch-export": "torch"}.get(framework, framework)
            return ModelCheck(runtime=runtime, device=classifier.device, classes=len(classifier.labels),
                              outputs=outputs, input=f"{shape} {spec.dtype} {spec.layout}")

    def read_model(self) -> bytes:
        """The model file's bytes, read once and checked against ``manifest.model_sha256``.

        Runtimes load these bytes rather than reopening ``model_path``: a file replaced between the
        check and the load would otherwise run unverified.
        """
        try:
            with open(self.model_path, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise BundleError(f"manifest.model_file: {self.manifest.model_file!r} is not a regular file")
                data = f.read()
        except FileNotFoundError:
            raise BundleError(f"manifest.model_file: {self.manifest.model_file!r} not found in {self.path}") from None
        except OSError as e:
            raise BundleError(f"manifest.model_file: cannot read {self.model_path}: {e}") from None
        self._check_sha256(hashlib.sha256(data).hexdigest())
        return data

    def _check_sha256(self, actual: str) -> None:
        if actual != self.manifest.model_sha256:
            raise BundleError(
                f"model_sha256 mismatch: manifest says {self.manifest.model_sha256}, file has {actual} "
                f"({self.model_path})"
            )

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    @property
    def labels_path(self) -> Path:
        return self.path / self.manifest.labels_file

    def close(self) -> None:
        """Remove the extraction directory of a zip bundle now (a no-op for directory bundles)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bundle({self.ref!r}, path={str(self.path)!r}, framework={self.manifest.framework!r})"


@dataclasses.dataclass(frozen=True)
class ModelCheck:
    """What :meth:`Bundle.check_model` found: the runtime that loaded the model and what a test image gave."""

    runtime: str  # "onnxruntime", "torch" or a plugin's name
    device: str
    classes: int  # classes reported (the label subset, or every label)
    outputs: int | None  # the model's output width on the test image
    input: str  # the test batch fed to it, e.g. "1x3x224x224 float32 NCHW"


def _copy_hashing(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def _write_zip(src_dir: Path, dst: Path) -> None:
    with zipfile.ZipFile(dst, "x", allowZip64=True) as zf:
        for f in sorted(src_dir.rglob("*")):
            if f.is_file():
                rel = f.relative_to(src_dir).as_posix()
                compress = zipfile.ZIP_DEFLATED if f.suffix in (".json", ".tsv") else zipfile.ZIP_STORED
                zf.write(f, rel, compress_type=compress)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def create_bundle(
    out: str | Path,
    *,
    model_file: str | Path,
    labels: Sequence[Label] | str | Path,
    name: str,
    version: str,
    framework: str | None = None,
    preprocess: PreprocessSpec = PreprocessSpec(),
    output_kind: str = "logits",
    num_outputs: int | None = None,
    label_subset: Sequence[int] | None = None,
    unknown: UnknownRule | None = None,
    temperature: float = 1.0,
    embedding_output: str | None = None,
    metrics: dict[str, float] | None = None,
    lineage: dict[str, str | None] | None = None,
    notes: str = "",
    copy_model: bool = True,
) -> Path:
    """Write a bundle directory at ``out`` (a ``.zip`` when ``out`` ends with ``.zip``) and return its path.

    Everything is validated before anything appears at ``out``; the bundle is built in a temporary
    sibling and renamed into place, so ``out`` is either absent or complete. ``out`` must not exist.
    ``copy_model=False`` hard-links the model when the filesystem allows (a copy otherwise).
    """
    out = Path(out)
    model_src = Path(model_file)
    if not model_src.is_file():
        raise BundleError(f"model_file: {model_src} is not a file")
    suffix = model_src.suffix.lower()
    if framework is None:
        if suffix not in _SUFFIX_FRAMEWORK:
            raise BundleError(
                f"manifest.framework: cannot infer it from the suffix {suffix!r} (.onnx -> onnx, .pt -> torchscript, "
                f".pt2 -> torch-export); pass framework="
            )
        framework = _SUFFIX_FRAMEWORK[suffix]
    if isinstance(labels, (str, Path)):
        label_list = read_labels(labels)
    else:
        label_list = list(labels)
        for label in label_list:
            if not isinstance(label, Label):
                raise BundleError(f"labels: expected Label objects or a TSV path, got {_describe(label)}")
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} already exists")
    is_zip = out.suffix.lower() == ".zip"
    model_name = "model" + suffix if suffix and re.fullmatch(r"\.[a-z0-9]+", suffix) else "model.bin"

    def manifest_for(sha: str) -> Manifest:
        return Manifest.from_dict(
            {
                "schema_version": SCHEMA_VERSION,
                "name": name,
                "version": version,
                "framework": framework,
                "model_file": model_name,
                "model_sha256": sha,
                "labels_file": LABELS_FILE,
                "preprocess": preprocess.to_dict() if isinstance(preprocess, PreprocessSpec) else preprocess,
                "output_kind": output_kind,
                "num_outputs": num_outputs,
                "label_subset": None if label_subset is None else list(label_subset),
                "unknown": unknown.to_dict() if isinstance(unknown, UnknownRule) else unknown,
                "temperature": temperature,
                **({} if embedding_output is None else {"embedding_output": embedding_output}),
                "metrics": {} if metrics is None else metrics,
                "lineage": {} if lineage is None else lineage,
                "notes": notes,
                "created_at": _utc_now(),
            }
        )

    # Validate everything but the hash before touching the disk (and before hashing a large model).
    check_labels(manifest_for("0" * 64), label_list)

    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        staging = work / "bundle"
        staging.mkdir()
        model_dst = staging / model_name
        sha = None
        if not copy_model:
            try:
                os.link(model_src, model_dst)
                sha = _sha256_file(model_dst)
            except OSError:
                sha = None
        if sha is None:
            sha = _copy_hashing(model_src, model_dst)
        manifest = manifest_for(sha)
        write_labels(staging / LABELS_FILE, label_list)
        (staging / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8", newline="\n")
        for f in (staging / LABELS_FILE, staging / MANIFEST_FILE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(staging)
        if is_zip:
            archive = work / "bundle.zip"
            _write_zip(staging, archive)
            try:
                os.link(archive, out)  # no-clobber: fails if `out` appeared meanwhile
            except FileExistsError:
                raise FileExistsError(f"{out} already exists") from None
            except OSError:
                if out.exists():
                    raise FileExistsError(f"{out} already exists") from None
                os.rename(archive, out)
        else:
            if out.exists() or out.is_symlink():
                raise FileExistsError(f"{out} already exists")
            try:
                os.rename(staging, out)
            except OSError as e:
                if out.exists():
                    raise FileExistsError(f"{out} already exists") from None
                raise e
        _fsync_dir(parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
