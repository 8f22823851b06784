"""The ``speciesclf`` command."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["main"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _image_paths(paths: list[str], problems: list[str] | None = None) -> list[Path]:
    """Files as given, and the image files inside folders. A path the OS cannot even look up is kept (its
    row says why); a folder that cannot be walked to the end goes into ``problems``."""
    found: list[Path] = []
    for p in map(Path, paths):
        try:
            is_dir = p.is_dir()
        except OSError:  # e.g. a name too long: read_file reports it on the path's own row
            is_dir = False
        if not is_dir:
            found.append(p)
            continue
        inside: list[Path] = []
        try:
            for f in p.rglob("*"):
                try:
                    if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file():
                        inside.append(f)
                except OSError:
                    inside.append(f)
        except OSError as e:
            if problems is not None:
                problems.append(f"{_shown(p)}: cannot search the whole folder ({e.strerror or e})")
        found.extend(sorted(inside))
    return found


def _found_images(args_paths: list[str]) -> tuple[list[Path], list[str]]:
    """The images under ``args_paths`` and the problems met finding them (each printed as a warning), with an
    error line when none is found."""
    problems: list[str] = []
    paths = _image_paths(args_paths, problems)
    for problem in problems:
        print(f"speciesclf: warning: {problem}", file=sys.stderr)
    if not paths:
        print("speciesclf: error: no images found", file=sys.stderr)
    return paths, problems


def _shown(path: Path | str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


def _one_line(text: str) -> str:
    """For the table: a newline or carriage return in a name must not split or overwrite its row."""
    return text.translate(_CONTROL)


def _finite_or_none(value):
    """JSON has no NaN or infinity (a broken model can produce them): null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _positive_int(text: str) -> int:
    """argparse type for counts (--top-k, --threads, --batch-size): checked before anything is loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _one_line_errors(run):
    """Wrap a handler so that errors print one line ``speciesclf: error: ...`` and exit 1, never a traceback.

    ValueError covers BundleError and RegistryError, RuntimeError the runtimes' ModelLoadError and the
    CUDA errors, OSError unreadable or unwritable files. Any other exception (a runtime's own types, such as
    onnxruntime's Fail when a model fails amid a run) is named by its class, as it says less on its own.
    Every subcommand but info and serve uses it.
    """

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BrokenPipeError:
            raise  # the reader went away (| head): main() ends quietly
        except Exception as e:
            # One line even when a library's message has several (a runtime's list of bad dimensions).
            message = re.sub(r"\s*\n\s*", "; ", re.sub(r":\s*\n\s*", ": ", str(e).strip()))
            if not isinstance(e, (ValueError, RuntimeError, OSError)):
                message = f"{type(e).__name__}: {message}"
            print(f"speciesclf: error: {message}", file=sys.stderr)
            return 1

    return wrapped


def _show_progress(args: argparse.Namespace) -> bool:
    """--progress auto: a bar on stderr when stderr is a terminal and stdout is not (on one terminal the
    rows themselves show the progress, and a bar would be drawn across them)."""
    if args.progress == "auto":
        return sys.stderr.isatty() and not sys.stdout.isatty() and not args.quiet
    return args.progress == "on"


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    print(format_info(info(), as_json=args.json))
    return 0


def _replace_file(path: Path, write) -> None:
    """Write through a temporary sibling and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cmd_preprocess(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from .errors import error_body
    from .preprocessing.preprocess import preprocess_batch
    from .preprocessing.spec import PreprocessSpec

    paths, problems = _found_images(args.paths)
    if not paths:
        return 1
    spec = PreprocessSpec(size=args.size, resize=args.resize or None, dtype=args.dtype, layout=args.layout)
    start = time.perf_counter()
    batch = preprocess_batch(paths, spec, backend=args.backend, threads=args.threads, on_error="skip")
    elapsed = time.perf_counter() - start
    for i, error in sorted(batch.errors.items()):
        print(f"{_shown(paths[i])}: {type(error).__name__}: {error}", file=sys.stderr)
    print(
        f"{int(batch.ok.sum())}/{len(paths)} images -> array {tuple(batch.array.shape)} {batch.array.dtype} "
        f"in {elapsed * 1000:.0f} ms ({len(paths) / max(elapsed, 1e-9):.0f} img/s)"
    )
    if args.output:
        if not batch.ok.any():
            print("speciesclf: error: no image could be preprocessed: nothing written", file=sys.stderr)
            return 1
        target = Path(args.output if args.output.endswith(".npy") else args.output + ".npy")
        stem = str(target)[: -len(".npy")]
        # Failed rows hold NaN (0 for uint8): the mask and the index beside the array say which rows those are.
        index = {
            "files": [_shown(p) for p in paths],
            "errors": [{"index": i, "file": _shown(paths[i]), **error_body(e)} for i, e in sorted(batch.errors.items())],
        }
        _replace_file(Path(stem + ".ok.npy"), lambda f: np.save(f, batch.ok))
        _replace_file(Path(stem + ".index.json"),
                      lambda f: f.write((json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode()))
        _replace_file(target, lambda f: np.save(f, batch.array))
    return 0 if batch.all_ok and not problems else 1


# --- classify's output ---------------------------------------------------------------------------------------

_GUESS = "unknown (guess: {guess} {score:.3f})"


def _label_text(p) -> str:
    """The label column: the class, or ``unknown`` with the best guess visibly marked as a guess."""
    if p.unknown:
        return _GUESS.format(guess=_one_line(p.guess or "?"), score=p.score if p.score is not None else math.nan)
    return _one_line(p.label or "")


def _error_fields(p) -> tuple[str, str]:
    """(code, message) of a failed prediction, as its JSON carries them."""
    error = p.to_dict()["error"] or {}
    return str(error.get("code") or error.get("type") or ""), str(error.get("message", ""))


def _fit_left(text: str, width: int) -> str:
    """``text`` in ``width`` characters, cut at the left (the end of a path says most) with an ellipsis."""
    return text if len(text) <= width else "\u2026" + text[len(text) - width + 1:]


class _Table:
    """classify's table: a header, then one aligned row per image.

    Rows are printed as predictions arrive, so the widths are settled first, from what the rows can hold:
    the file column from the file names, the label column from the model's class names (plus the
    ``unknown (guess: ...)`` form when the model has an open-set rule). On a terminal the file column gives
    way to fit the terminal's width (names cut at the left) and the top-k column is cut at the right.
    """

    def __init__(self, names: list[str], labels: list[str], *, can_be_unknown: bool, top_k: int,
                 columns: int | None) -> None:
        self.columns = columns
        longest = max((len(_one_line(label)) for label in labels), default=0)
        self.label_width = max(len("LABEL"), longest,
                               len(_GUESS.format(guess="x" * longest, score=0.0)) if can_be_unknown else 0)
        self.file_width = max([len("FILE"), *map(len, names)])
        fixed = 2 + self.label_width + 2 + 5 + 2 + len("OPEN-SET") + 2
        if columns is not None and self.file_width + fixed + 24 > columns:
            self.file_width = max(len("FILE"), 16, columns - fixed - 24)  # 24: room for the top-k column
        self.top_header = f"TOP-{top_k}"

    def _line(self, file: str, rest: str) -> str:
        line = f"{_fit_left(file, self.file_width):<{self.file_width}}  {rest}".rstrip()
        if self.columns is not None and len(line) > self.columns:
            line = line[: self.columns - 1] + "\u2026"
        return line

    def header(self) -> str:
        return self._line("FILE", f"{'LABEL':<{self.label_width}}  {'SCORE':>5}  OPEN-SET  {self.top_header}")

    def row(self, name: str, p) -> str:
        if p.error is not None:
            code, message = _error_fields(p)
            return self._line(_one_line(name), _one_line(f"error: {code}: {message}"))
        score = "-" if p.unknown or p.score is None else f"{p.score:.3f}"
        open_set = "" if p.open_set_score is None else f"{p.open_set_score:.3f}"
        top = "; ".join(f"{_one_line(label)} {score_:.3f}" for label, score_ in p.top_k)
        return self._line(_one_line(name), f"{_label_text(p):<{self.label_width}}  {score:>5}  {open_set:>8}  {top}")


_CSV_COLUMNS = ["file", "label", "guess", "score", "open_set_score", "unknown", "scientific_name", "top_k",
                "error_code", "error"]


def _csv_row(name: str, p) -> list[str]:
    def number(value) -> str:
        return "" if value is None else f"{value:.4f}"

    code, message = _error_fields(p) if p.error is not None else ("", "")
    top = "; ".join(f"{label} {score:.4f}" for label, score in p.top_k)
    return [name, p.label or "", p.guess or "", number(p.score), number(p.open_set_score),
            "true" if p.unknown else "false", p.scientific_name or "", top, code, message]


def _can_be_unknown(classifier) -> bool:
    from .evaluate import open_set_rule

    return open_set_rule(classifier) is not None


def _cmd_classify(args: argparse.Namespace) -> int:
    import csv
    import json
    import shutil

    from .model.classifier import Classifier

    paths, problems = _found_images(args.paths)
    if not paths:
        return 1
    # Errors (no such model, no GPU, a model that is not valid ONNX, ...) reach _one_line_errors.
    clf = Classifier.load(args.model, device=args.device, batch_size=args.batch_size, threads=args.threads,
                          precision=args.precision)
    names = [_shown(p) for p in paths]
    failed = 0
    fmt = args.format
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(_CSV_COLUMNS)
    elif fmt == "table":
        columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        table = _Table([_one_line(n) for n in names], clf.labels, can_be_unknown=_can_be_unknown(clf),
                       top_k=args.top_k, columns=columns)
        print(table.header())
    elif fmt == "json":
        print("[")
    predictions = clf.predict_iter(paths, top_k=args.top_k, progress=_show_progress(args))
    for i, p in enumerate(predictions):
        name = names[i]
        failed += not p.ok
        if fmt in ("json", "jsonl"):
            text = json.dumps(_finite_or_none({"file": name, **p.to_dict()}), allow_nan=False, ensure_ascii=False)
            print(text if fmt == "jsonl" or i == len(paths) - 1 else text + ",")
        elif fmt == "csv":
            writer.writerow(_csv_row(name, p))
        else:
            print(table.row(name, p))
    if fmt == "json":
        print("]")
    if failed:
        print(f"{failed} of {len(paths)} images could not be classified", file=sys.stderr)
    return 1 if failed or problems else 0


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--thresholds: expected comma-separated numbers in [0, 1], got {text!r}")
    return values


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .model.classifier import Classifier
    from .evaluate import evaluate, load_dataset

    if args.per_class == "all":
        per_class = None
    elif args.per_class.isdecimal():
        per_class = int(args.per_class)
    else:
        raise ValueError(f"--per-class: expected a count or 'all', got {args.per_class!r}")
    thresholds = None if args.thresholds is None else _thresholds(args.thresholds)
    data = load_dataset(args.data, label_column=args.label_column)  # before the model: a bad CSV fails fast
    with Classifier.load(args.model, device=args.device, batch_size=args.batch_size, threads=args.threads,
                         precision=args.precision) as clf:
        report = evaluate(clf, data, match=args.match, thresholds=thresholds, progress=_show_progress(args))
    if args.json:
        print(json.dumps(_finite_or_none(report.to_dict()), indent=2, ensure_ascii=False, allow_nan=False))
    else:
        print(report.format(per_class=per_class))
    if report.errors:
        print(f"speciesclf: warning: {len(report.errors)} of {report.images} images could not be classified",
              file=sys.stderr)
    return 0


# --- the parser ----------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one and the text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS, [], ()) and "%(default)" not in text
                and "default" not in text):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _add_progress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="a progress bar (rate, ETA) on stderr; auto: when stderr is a terminal and stdout is not")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the same as --progress off)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="species100",
                   help="bundle path, registry reference (name@version|alias) or built-in model")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (GPU decoding and inference)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="inference dtype of torch models (fp16/bf16 on GPUs); default: the model's own")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per inference call")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for preprocessing and inference; default: the cores this process may use")


def build_parser() -> argparse.ArgumentParser:
    """The ``speciesclf`` argument parser (every subcommand)."""
    from ._version import __version__
    from .model.classifier import Classifier
    import inspect

    parser = _Parser(prog="speciesclf", description="Image classification as a component.")
    parser.add_argument("--version", action="version", version=f"speciesclf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # One default for the number of guesses: the library's own (Python and HTTP answer with the same).
    top_k_default = inspect.signature(Classifier.predict).parameters["top_k"].default

    p = sub.add_parser("classify", help="classify images (files or folders) with a model")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    _add_model_options(p)
    p.add_argument("--top-k", type=_positive_int, default=top_k_default, help="guesses shown per image")
    p.add_argument("--format", choices=["table", "json", "jsonl", "csv"], default="table",
                   help="table: aligned columns with a header; json: one JSON array; jsonl: one JSON object per "
                        "line (JSON Lines); csv: a header row, then one row per image")
    _add_progress_options(p)
    p.set_defaults(run=_one_line_errors(_cmd_classify))

    p = sub.add_parser("evaluate", help="accuracy of a model on a labelled dataset (a class-folder tree or a "
                                        "labels CSV): top-1/top-5, per class, unknown rate, open-set threshold sweep")
    p.add_argument("data", help="a folder with one subfolder per class, or a labels CSV (a file column and a "
                                "class name and/or class_index column; paths relative to the CSV)")
    _add_model_options(p)
    p.add_argument("--match", choices=["auto", "name", "index"], default="auto",
                   help="how dataset classes meet model classes: by name (case, '_' and '-' ignored) or by "
                        "class_index as the model's output index; auto: by name when the dataset has names")
    p.add_argument("--label-column", default=None,
                   help="the CSV column of class names; default: the first of species, name, label, class, "
                        "class_name, animal")
    p.add_argument("--thresholds", default=None, metavar="T1,T2,...",
                   help="open-set score thresholds to sweep; default: 0.05 to 0.95 in steps of 0.05")
    p.add_argument("--per-class", default="20", metavar="N|all",
                   help="classes shown in the printed per-class table, worst recall first (all of them in --json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    _add_progress_options(p)
    p.set_defaults(run=_one_line_errors(_cmd_evaluate))

    p = sub.add_parser("info", help="version, native module, codecs, threads, CUDA")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("preprocess", help="decode, resize, crop and normalise images into one batch")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--size", type=int, default=224, help="output height and width")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the crop; 0 squashes")
    p.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="float32", help="output dtype")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="output layout")
    p.add_argument("--backend", choices=["auto", "native", "python"], default="auto",
                   help="native: the C++ core; python: Pillow; auto: native where it is built")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="decoding threads; default: the cores this process may use")
    p.add_argument("--output", metavar="FILE.npy",
                   help="save the batch as a .npy file, with FILE.ok.npy (which rows hold an image) and "
                        "FILE.index.json (the file of each row, the errors) beside it; nothing is written "
                        "when no image could be read")
    p.set_defaults(run=_one_line_errors(_cmd_preprocess))

    _add_bundle_registry_commands(sub)
    _add_serve_command(sub)
    _add_rollout_command(sub)
    _add_capture_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: stop without a traceback, with the shell's status for SIGINT
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say, and nowhere to say it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


# ------------------------------------------------------------------------------------------------
# `speciesclf bundle ...` and `speciesclf registry ...` (model bundles and the local registry).
# Self-contained: everything below is reached only through _add_bundle_registry_commands().
# ------------------------------------------------------------------------------------------------


def _metric_pair(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER, got {text!r}") from None


def _index_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated output indices, got {text!r}") from None


def _cmd_bundle_create(args: argparse.Namespace) -> int:
    from .bundles.bundle import UnknownRule, create_bundle
    from .preprocessing.spec import PreprocessSpec

    spec_args = {
        "size": args.size,
        "resize": args.resize or None,
        "interpolation": args.interpolation,
        "dtype": args.dtype,
        "layout": args.layout,
    }
    if args.mean is not None:
        spec_args["mean"] = tuple(args.mean)
    if args.std is not None:
        spec_args["std"] = tuple(args.std)
    try:
        spec = PreprocessSpec(**spec_args)
    except ValueError as e:
        print(f"speciesclf: error: preprocess: {e}", file=sys.stderr)
        return 1
    if (args.unknown_method is None) != (args.unknown_threshold is None):
        print("speciesclf: error: --unknown-method and --unknown-threshold go together", file=sys.stderr)
        return 1
    unknown = UnknownRule(args.unknown_method, args.unknown_threshold) if args.unknown_method else None
    lineage = {k: v for k, v in (("parent_version", args.parent_version), ("training_data", args.training_data)) if v}
    out = create_bundle(
        args.out,
        model_file=args.model,
        labels=args.labels,
        name=args.name,
        version=args.version,
        framework=args.framework,
        preprocess=spec,
        output_kind=args.output_kind,
        num_outputs=args.num_outputs,
        label_subset=args.label_subset,
        unknown=unknown,
        temperature=args.temperature,
        metrics=dict(args.metric or []),
        lineage=lineage,
        notes=args.notes,
        copy_model=not args.link,
    )
    print(f"{args.name}@{args.version} -> {out}")
    return 0


def _bundle_summary(bundle) -> str:
    m = bundle.manifest
    p = m.preprocess
    lines = [
        f"bundle      {bundle.ref}",
        f"path        {bundle.source}",
        f"framework   {m.framework} ({m.model_file}, sha256 {m.model_sha256[:16]}...)",
        f"outputs     {m.output_kind}, {m.num_outputs if m.num_outputs is not None else '?'} outputs, "
        f"temperature {m.temperature:g}",
        f"labels      {len(bundle.labels)} ({m.labels_file})"
        + (f", subset of {len(m.label_subset)} outputs" if m.label_subset is not None else ""),
        f"preprocess  size {p.size}, resize {p.resize}, {p.interpolation}, {p.dtype} {p.layout}, "
        f"mean {list(p.mean)}, std {list(p.std)}",
    ]
    if m.unknown is not None:
        lines.append(f"unknown     {m.unknown.method} < {m.unknown.threshold:g}")
    if m.metrics:
        lines.append("metrics     " + ", ".join(f"{k}={v:g}" for k, v in sorted(m.metrics.items())))
    if any(m.lineage.values()):
        lines.append("lineage     " + ", ".join(f"{k}={v}" for k, v in sorted(m.lineage.items()) if v))
    if m.created_at:
        lines.append(f"created     {m.created_at}")
    if m.notes:
        lines.append(f"notes       {m.notes}")
    return "\n".join(lines)


def _cmd_bundle_inspect(args: argparse.Namespace) -> int:
    """The manifest as the bundle states it, and whether its model file is still the one it names: a
    tampered bundle is shown (what it claims to be helps to find out what happened) and the command fails."""
    import json

    from .bundles.bundle import Bundle, BundleError

    with Bundle.open(args.path, verify=False) as bundle:
        try:
            bundle.verify()
            tampered = None
        except BundleError as e:
            tampered = e
        if args.json:
            print(json.dumps(bundle.manifest.to_dict(), sort_keys=True, indent=2, ensure_ascii=False))
        else:
            print(_bundle_summary(bundle))
            print(f"integrity   {'MISMATCH: the model file is not the one the manifest names' if tampered else 'ok'}")
    if tampered is not None:
        print(f"speciesclf: error: {tampered}", file=sys.stderr)
        return 1
    return 0


def _cmd_bundle_verify(args: argparse.Namespace) -> int:
    from .bundles.bundle import Bundle

    with Bundle.open(args.path, verify=True) as bundle:
        digest = bundle.manifest.model_sha256
        if args.hash_only:
            print(f"{bundle.ref}: ok (sha256 {digest} matches; the model was not loaded: --hash-only)")
            return 0
        check = bundle.check_model(device=args.device)
    width = f"{check.outputs} outputs" if check.outputs is not None else "its outputs"
    print(f"{bundle.ref}: ok\n"
          f"  sha256    {digest} matches the manifest\n"
          f"  model     {check.runtime} loads it on {check.device}\n"
          f"  test run  a {check.input} batch gives {width}, finite, read as {check.classes} classes")
    return 0


def _registry(args: argparse.Namespace):
    from .bundles.registry import Registry

    return Registry(getattr(args, "root", None))


def _cmd_registry_list(args: argparse.Namespace) -> int:
    import json

    reg = _registry(args)
    table = {name: {"versions": reg.versions(name), "aliases": reg.aliases(name)} for name in reg.names()}
    if args.json:
        print(json.dumps(table, sort_keys=True, indent=2))
    elif not table:
        print(f"no bundles in {reg.root}")
    else:
        for name, entry in table.items():
            aliases = ", ".join(f"{a} -> {v}" for a, v in entry["aliases"].items()) or "-"
            print(f"{name}  versions: {', '.join(entry['versions'])}  aliases: {aliases}")
    return 0


def _cmd_registry_register(args: argparse.Namespace) -> int:
    reg = _registry(args)
    ref = reg.register(args.path, aliases=args.alias or ())
    print(ref)
    return 0


def _cmd_registry_alias(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.remove:
        if args.version is not None:
            print("speciesclf: error: --remove takes no VERSION", file=sys.stderr)
            return 1
        reg.remove_alias(args.name, args.alias)
        print(f"removed {args.name}@{args.alias}")
    else:
        if args.version is None:
            print("speciesclf: error: VERSION is required (or --remove)", file=sys.stderr)
            return 1
        reg.set_alias(args.name, args.alias, args.version)
        print(f"{args.name}@{args.alias} -> {args.version}")
    return 0


def _cmd_registry_resolve(args: argparse.Namespace) -> int:
    print(_registry(args).resolve(args.ref))
    return 0


def _cmd_registry_delete(args: argparse.Namespace) -> int:
    _registry(args).delete(args.name, args.version)
    print(f"deleted {args.name}@{args.version}")
    return 0


def _add_bundle_registry_commands(sub) -> None:
    from .preprocessing.spec import PreprocessSpec

    defaults = PreprocessSpec()

    bundle = sub.add_parser("bundle", help="create, inspect and verify model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)

    p = bsub.add_parser("create", help="write a bundle directory (or .zip) from a model file and labels")
    p.add_argument("out", help="the bundle directory to create, or a path ending in .zip")
    p.add_argument("--model", required=True, help="model file (.onnx, .pt, .pt2)")
    p.add_argument("--labels", required=True, help="labels TSV: index<TAB>name[<TAB>scientific_name]")
    p.add_argument("--name", required=True, help="bundle name: ^[a-z0-9][a-z0-9._-]{0,63}$")
    p.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    p.add_argument("--framework", choices=["onnx", "torchscript", "torch-export"],
                   help="the model's format; default: from the suffix (.onnx, .pt, .pt2)")
    p.add_argument("--size", type=int, default=defaults.size, help="model input height and width")
    p.add_argument("--resize", type=int, default=defaults.resize, help="shorter side before the crop; 0 squashes")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help=f"normalisation mean; default: {' '.join(map(str, defaults.mean))} (ImageNet)")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help=f"normalisation std; default: {' '.join(map(str, defaults.std))} (ImageNet)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], default=defaults.interpolation,
                   help="resampling filter")
    p.add_argument("--dtype", choices=["float32", "float16", "uint8"], default=defaults.dtype,
                   help="model input dtype")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default=defaults.layout, help="model input layout")
    p.add_argument("--output-kind", choices=["logits", "probabilities"], default="logits",
                   help="what the model returns")
    p.add_argument("--num-outputs", type=int, help="the model's output width; default: not stated (checked at load)")
    p.add_argument("--label-subset", type=_index_list,
                   help="comma-separated model output indices to keep (renormalised); default: all outputs")
    p.add_argument("--unknown-method", choices=["subset_mass", "max_probability"],
                   help="open-set rule (with --unknown-threshold); default: none, never unknown")
    p.add_argument("--unknown-threshold", type=float, help="unknown when the rule's score is below it (0 < t < 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument("--metric", type=_metric_pair, action="append", metavar="KEY=VALUE",
                   help="a metric to record, e.g. top1=0.91 (repeatable)")
    p.add_argument("--parent-version", help="lineage: the version this one was derived from")
    p.add_argument("--training-data", help="lineage: what it was trained on")
    p.add_argument("--notes", default="", help="free text")
    p.add_argument("--link", action="store_true", help="hard-link the model instead of copying it (if possible)")
    p.set_defaults(run=_one_line_errors(_cmd_bundle_create))

    p = bsub.add_parser("inspect", help="print a bundle's manifest; exit 1 when its model file does not match "
                                        "the manifest's sha256")
    p.add_argument("path", help="bundle directory or .zip")
    p.add_argument("--json", action="store_true", help="the full manifest as JSON")
    p.set_defaults(run=_one_line_errors(_cmd_bundle_inspect))

    p = bsub.add_parser("verify", help="check a bundle: manifest, labels, the model's sha256, and that its runtime "
                                       "loads the model and a test image fits its input and outputs")
    p.add_argument("path", help="bundle directory or .zip")
    p.add_argument("--hash-only", action="store_true",
                   help="only check the sha256 (fast for huge models): the model is not loaded")
    p.add_argument("--device", default="cpu", help="where the model is loaded for the check: cpu or cuda[:N]")
    p.set_defaults(run=_one_line_errors(_cmd_bundle_verify))

    # --root is accepted both before and after the registry subcommand.
    root_help = "registry root (default: $SPECIESCLF_HOME/registry, see speciesclf.bundles.registry.default_home)"
    registry = sub.add_parser("registry", help="the local bundle registry: versions and aliases")
    registry.add_argument("--root", default=None, help=root_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=root_help)
    rsub = registry.add_subparsers(dest="registry_command", required=True)

    p = rsub.add_parser("list", parents=[common], help="names, versions and aliases")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(run=_one_line_errors(_cmd_registry_list))

    p = rsub.add_parser("register", parents=[common], help="copy a bundle into the registry")
    p.add_argument("path", help="bundle directory or .zip")
    p.add_argument("--alias", action="append", help="also point this alias at it (repeatable)")
    p.set_defaults(run=_one_line_errors(_cmd_registry_register))

    p = rsub.add_parser("alias", parents=[common], help="point NAME@ALIAS at VERSION")
    p.add_argument("name", help="bundle name")
    p.add_argument("alias", help="alias, e.g. production")
    p.add_argument("version", nargs="?", help="the version it points at (not with --remove)")
    p.add_argument("--remove", action="store_true", help="remove the alias instead")
    p.set_defaults(run=_one_line_errors(_cmd_registry_alias))

    p = rsub.add_parser("resolve", parents=[common], help="print the bundle directory of name[@version|@alias]")
    p.add_argument("ref", help="name, name@version or name@alias (a bare name means name@production)")
    p.set_defaults(run=_one_line_errors(_cmd_registry_resolve))

    p = rsub.add_parser("delete", parents=[common], help="remove NAME@VERSION (refused while an alias uses it)")
    p.add_argument("name", help="bundle name")
    p.add_argument("version", help="the version to remove")
    p.set_defaults(run=_one_line_errors(_cmd_registry_delete))


# ------------------------------------------------------------------------------------------------
# `speciesclf rollout ...` (a candidate version beside the primary: in the registry, or on a running
# service through its admin API). Self-contained: reached only through _add_rollout_command().
# ------------------------------------------------------------------------------------------------

_ROLLOUT_ACTIONS = ("pause", "resume", "promote", "rollback")


def _rollout_spec(text: str) -> str:
    """argparse type of --rollout (rollout start, serve): a spec that does not parse is a usage error (exit 2)
    before anything loads or runs."""
    from .rollout import RolloutSpecError, parse_rollout

    try:
        parse_rollout(text)
    except RolloutSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _rollout_weight(text: str) -> float:
    """argparse type of a weight: a share (0.25) or a percentage (25%) of the routing keys."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"a weight is a share in [0, 1] (0.25) or a percentage (25%), got {text!r}")
    return value


def _rollout_name_of(model: str | None) -> str | None:
    return None if model is None else model.rpartition("@")[0] or model


def _rollout_is_active(state: dict | None) -> bool:
    from .rollout.state import ACTIVE_PHASES

    return state is not None and state.get("phase") in ACTIVE_PHASES


def _rollout_busy(state: dict) -> str:
    return (f"a rollout of {state['name']}@{state['candidate']} is {state['phase']}: roll it back, promote it, "
            "or start with --replace to end it first")


def _rollout_on_service(args: argparse.Namespace) -> dict:
    """The command through a running service's admin API; returns the service's status afterwards."""
    from .serve.admin_client import AdminClient, AdminError

    client = AdminClient(args.url, args.admin_token_file)
    status = client.get("/v1/admin/rollout")
    serving = _rollout_name_of(status.get("primary"))
    if serving != args.name:
        raise AdminError(f"the service at {client.base} serves {serving}, not {args.name}")
    command = args.rollout_command
    if command == "status":
        if status.get("rollout") is None:
            raise AdminError(f"no rollout of {args.name} on the service at {client.base} "
                              f"(primary {status['primary']})")
        return status
    if command == "start":
        if getattr(args, "force", False):
            raise ValueError("--force is for the registry mode: the service decides itself which versions it takes")
        if _rollout_is_active(status.get("rollout")) and not args.replace:
            raise AdminError(_rollout_busy(status["rollout"]))
        other, at, version = args.version.rpartition("@")
        if at and other != args.name:
            raise ValueError(f"{args.version!r} is not a version of {args.name}")
        return client.post("/v1/admin/rollout/start", {"candidate": f"{args.name}@{version}", "rollout": args.rollout})
    if command == "weight":
        return client.post("/v1/admin/rollout/weight", {"weight": args.weight})
    return client.post(f"/v1/admin/rollout/{command}", {"reason": args.reason} if args.reason else {})


def _rollout_version(registry, name: str, versions: list[str], given: str) -> str:
    """VERSION as given: a version of ``name``, ``name@version``, or an alias of ``name``."""
    from .bundles.registry import RegistryError

    other, at, tag = given.rpartition("@")
    if at:
        if other != name:
            raise RegistryError(f"{given!r} is not a version of {name}")
        given = tag
    if given in versions:
        return given
    aliased = registry.aliases(name).get(given)
    if aliased is not None:
        return aliased
    raise RegistryError(f"{name}@{given} is not registered (versions: {', '.join(versions)})")


def _rollout_in_registry(args: argparse.Namespace) -> dict:
    """The command on the rollout state in the registry; returns the state afterwards, shaped like a
    service's status (primary, candidate, rollout) plus the registry's rejections."""
    from .bundles.registry import Registry, RegistryError
    from .rollout import RegistryStore, Rollout, RolloutError, parse_rollout

    registry = Registry(args.registry)
    name = args.name
    versions = registry.versions(name)  # also refuses a name that is not a valid one
    if not versions:
        raise RegistryError(f"no bundle named {name!r} in the registry {registry.root}")
    rollout = Rollout(RegistryStore(registry, name), name=name, registry=registry)
    command = args.rollout_command
    if command == "status" and rollout.state is None:
        production = registry.aliases(name).get("production", "no production alias")
        raise RolloutError(f"no rollout of {name} (production -> {production}); start one with "
                           f"speciesclf rollout start {name} VERSION")
    if command == "start":
        version = _rollout_version(registry, name, versions, args.version)
        primary = registry.aliases(name).get("production")
        if primary is None:
            raise RegistryError(f"{name} has no production alias: the primary of a rollout is the version it points "
                                f"at (speciesclf registry alias {name} production VERSION)")
        rejected = registry.rejections(name).get(version)
        if rejected is not None and not args.force:
            raise RolloutError(f"{name}@{version} was rejected by a rollout ({rejected.get('reason')}); "
                               "--force starts it again")
        if _rollout_is_active(rollout.state) and not args.replace:
            raise RolloutError(_rollout_busy(rollout.state))
        rollout.start(primary, version, parse_rollout(args.rollout), replace=args.replace)
        if rejected is not None:
            registry.unreject(name, version)  # forced: a later rollback marks it again, with its own reason
    elif command == "weight":
        rollout.set_weight(args.weight)
    elif command in _ROLLOUT_ACTIONS:
        action = getattr(rollout, command)
        action(args.reason) if args.reason else action()
    state = rollout.status()
    production = registry.aliases(name).get("production")
    return {"primary": None if production is None else f"{name}@{production}",
            "candidate": f"{name}@{state['candidate']}" if _rollout_is_active(state) else None,
            "rollout": state, "rejected": registry.rejections(name), "registry": str(registry.root.resolve())}


def _rollout_when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _rollout_summary(result: dict, verdicts_shown: int = 5) -> str:
    """``rollout status``: the versions, the phase, where the traffic is, the gates and the last verdicts."""
    state = result["rollout"]
    policy, counts = state["policy"], state["counts"]
    steps = policy["steps"]
    # The reason of the last pause, rollback, promotion or abort; a resumed rollout's is history.
    said = state.get("reason") if state["phase"] != "running" else None
    phase = state["phase"] + (f" ({said})" if said else "")
    lines = [f"rollout     {state['name']}: {policy['mode']} of {state['candidate']} beside {state['primary']}",
             f"phase       {_one_line(phase)}",
             f"primary     {result.get('primary') or '-'}",
             f"candidate   {result.get('candidate') or '-'}"]
    active = _rollout_is_active(state)
    if policy["mode"] == "canary":
        weight = state["weight"] if active else 0.0
        lines.append(f"weight      {weight:.0%} of the routing keys (step {state['step'] + 1} of {len(steps)}: "
                     f"{', '.join(f'{s:g}' for s in steps)} %)")
    else:
        lines.append(f"weight      0% (shadow: {policy['shadow_share']:.0%} of the requests copied to the candidate)")
    if active:
        held = max(0.0, time.time() - state["step_started_at"])
        what = "comparisons" if policy["mode"] == "shadow" else "candidate requests"
        lines.append(f"step        {state['step_requests']} of {policy['min_requests']} {what}, "
                     f"{held:.0f} of {policy['min_seconds']:g} s")
    p, c, compare = counts["primary"], counts["candidate"], counts["compare"]
    lines.append(f"requests    primary {p['requests']} (errors {p['errors']}), candidate {c['requests']} "
                 f"(errors {c['errors']}, answered by the primary {c['fallbacks']})")
    lines.append(f"compared    {compare['compared']} (shed {compare['shed']}, failed {compare['failed']})")
    lines += ["", f"{'gate':<11} {'n':>7} {'events':>7} {'rate':>7} {'allowed':>8} {'llr':>8}  {'threshold':>9}  state"]
    for gate, g in state.get("gates", {}).items():
        rate = "-" if g["rate"] is None else f"{g['rate']:.1%}"
        verdict = "tripped" if g["tripped"] else "ok" if g["active"] else "no baseline"
        lines.append(f"{gate:<11} {g['n']:>7} {g['events']:>7} {rate:>7} {g['p0']:>8.1%} {g['llr']:>8.2f}  "
                     f"{g['threshold']:>9.2f}  {verdict}")
    history = state.get("history", [])
    lines += ["", f"verdicts (the last {min(len(history), verdicts_shown)} of {len(history)})"]
    for entry in history[-verdicts_shown:]:
        lines.append(f"  {_rollout_when(entry.get('at'))}  {entry['verdict']:<8} {entry['weight']:>5.0%}  "
                     f"{_one_line(str(entry.get('reason') or ''))}")
    return "\n".join(lines)


def _rollout_done(result: dict, in_registry: bool) -> str:
    """One line for an action: what it did, and where the rollout stands now."""
    state = result["rollout"]
    entry = state["history"][-1]
    line = (f"{state['name']}@{state['candidate']}: {entry['verdict']} ({_one_line(str(entry.get('reason') or ''))}); "
            f"now {state['phase']}")
    if state["policy"]["mode"] == "canary" and _rollout_is_active(state):
        line += f" at {state['weight']:.0%}"
    if in_registry and state["phase"] == "promoted":
        line += f"; {state['name']}@production -> {state['candidate']}"
    if in_registry and state["phase"] == "rolled_back":
        line += f"; {state['candidate']} is marked rejected"
    return line


def _cmd_rollout(args: argparse.Namespace) -> int:
    import json

    remote = args.url is not None
    if not remote and args.admin_token_file is not None:
        raise ValueError("--admin-token-file goes with --url (the registry needs no token)")
    result = _rollout_on_service(args) if remote else _rollout_in_registry(args)
    if args.json:
        print(json.dumps(_finite_or_none(result), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False))
    elif args.rollout_command == "status":
        print(_rollout_summary(result))
    else:
        print(_rollout_done(result, in_registry=not remote))
    return 0


def _add_rollout_command(sub) -> None:
    rollout = sub.add_parser(
        "rollout", help="a candidate version beside the primary: start, watch, pause, promote or roll back its "
                        "rollout, in the registry or on a running service (docs/rollout.md)",
        description="Against the registry (the default), the command changes the rollout state a service reads "
                    "(<registry>/NAME/rollout.json): a promote moves the registry alias 'production' to the "
                    "candidate, a rollback marks the candidate's version rejected. With --url it asks a running "
                    "service through its admin API instead.")
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--registry", metavar="DIR", default=None,
                       help="the registry holding NAME; default: $SPECIESCLF_HOME/registry (see "
                            "speciesclf.bundles.registry.default_home)")
    where.add_argument("--url", default=None,
                       help="a running service (http://127.0.0.1:8000) to ask through its admin API instead of "
                            "changing the registry")
    common.add_argument("--admin-token-file", metavar="FILE", default=None,
                        help="with --url: the file holding the service's admin token (sent as a bearer header, "
                             "never printed)")
    common.add_argument("--json", action="store_true", help="print the rollout's full status as JSON")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = rsub.add_parser(name, parents=[common], help=text, description=text)
        p.add_argument("name", metavar="NAME", help="the bundle name, e.g. species100")
        p.set_defaults(run=_one_line_errors(_cmd_rollout))
        return p

    command("status", "the phase, primary and candidate, the weight and step, every gate (n, events, llr, "
                      "threshold) and the last verdicts")
    p = command("start", "start a rollout of VERSION beside the version 'production' points at; refused for a "
                         "version a rollout rejected (unless --force) and while another rollout is running or "
                         "paused (unless --replace)")
    p.add_argument("version", metavar="VERSION",
                   help="the candidate: a registered version of NAME (1.1.0, NAME@1.1.0) or an alias")
    p.add_argument("--rollout", type=_rollout_spec, default="canary", metavar="SPEC",
                   help="canary[:STEP,...] (percent of the routing keys per step, the last 100; canary alone: "
                        "5,25,50,100) or shadow[:SHARE] (the share of requests copied to the candidate)")
    p.add_argument("--force", action="store_true",
                   help="registry only: start a version a rollout rejected (its rejection is cleared)")
    p.add_argument("--replace", action="store_true", help="end (abort) a rollout in progress and start this one")
    p = command("pause", "hold the rollout where it is (its traffic keeps flowing, no verdict is taken)")
    p.add_argument("--reason", help="why, kept in the verdict history; default: 'paused by a person'")
    p = command("resume", "go on with a paused rollout from its step")
    p.add_argument("--reason", help="why, kept in the verdict history; default: 'resumed by a person'")
    p = command("promote", "make the candidate the primary now; against the registry the alias 'production' "
                           "moves to it")
    p.add_argument("--reason", help="why, kept in the verdict history; default: 'promoted by a person'")
    p = command("rollback", "send no more traffic to the candidate; against the registry its version is marked "
                            "rejected, so it is not started again without --force")
    p.add_argument("--reason", help="why, kept in the verdict history and the rejection; default: "
                                    "'rolled back by a person'")
    p = command("weight", "send WEIGHT of the routing keys to the candidate of a canary; the steps go on from "
                          "the first one at or above it")
    p.add_argument("weight", metavar="WEIGHT", type=_rollout_weight, help="a share (0.25) or a percentage (25%%)")


# ------------------------------------------------------------------------------------------------
# `speciesclf capture ...` (a capture folder: its numbers, queries, export, retention and erasure; see
# docs/capture.md). Self-contained: reached only through _add_capture_command().
# ------------------------------------------------------------------------------------------------

_CAPTURE_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_CAPTURE_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                       "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _capture_duration(text: str) -> float:
    """argparse type for --retention: 30d, 12h, 90m, 45s or 2w, in seconds (above 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration above 0 such as 30d, 12h, 90m, 45s or 2w, got {text!r}")
    return float(match[1]) * _CAPTURE_DURATION_UNITS[match[2]]


def _capture_size(text: str) -> int:
    """argparse type for --max-bytes: 10GB, 500MB, 2GiB or a number of bytes (above 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in _CAPTURE_SIZE_UNITS or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size above 0 such as 10GB, 500MB, 2GiB or 1000000 (bytes), "
                                         f"got {text!r}")
    return int(float(match[1]) * _CAPTURE_SIZE_UNITS[match[2]])


def _capture_time(text: str) -> float:
    """argparse type for --since/--until: an ISO 8601 time (UTC when it names no zone) or a duration ago
    (24h, 7d, 30m)."""
    import datetime as dt

    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[smhdw]\s*", text.lower()):
        return time.time() - _capture_duration(text)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO time (2026-12-01T08:00:00Z) or a duration ago "
                                         f"(24h, 7d), got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _capture_id(text: str) -> str:
    from .capture.store import is_prediction_id

    if not is_prediction_id(text.strip()):
        raise argparse.ArgumentTypeError(f"expected a prediction id (26 characters, e.g. 01JEXAMPLE...), got {text!r}")
    return text.strip()


def _capture_iso(t: float | None) -> str | None:
    import datetime as dt

    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _capture_open(args: argparse.Namespace, **options):
    """The store in DIR, which must already be a capture folder: a mistyped path is an error, not a new
    empty store."""
    from .capture import SqliteCaptureStore

    root = Path(args.dir)
    if not (root / "records.sqlite3").is_file():
        raise ValueError(f"{_shown(root)}: not a capture folder (no records.sqlite3 in it)")
    return SqliteCaptureStore(root, **options)


def _capture_filters(args: argparse.Namespace) -> dict:
    return {"since": args.since, "until": args.until, "version": args.version, "arm": args.arm, "label": args.label,
            "unknown": args.unknown, "has_feedback": args.has_feedback}


def _capture_folder_stats(store) -> dict:
    """stats() of the folder, with what only the folder knows (feedback, time span) and without the counters
    of this process, which captured nothing: drops are counted by the capturing service."""
    numbers = store.stats()
    with store._read_lock:
        db = store._reader
        with_image, unknown, with_feedback, oldest, newest = db.execute(
            "SELECT count(image_sha256), coalesce(sum(unknown), 0), coalesce(sum(has_feedback), 0), min(t), max(t) "
            "FROM records").fetchone()
        by_source = dict(db.execute("SELECT source, count(*) FROM feedback GROUP BY source ORDER BY source").fetchall())
    return {
        "records": numbers["records"], "records_with_image": with_image, "unknown": unknown,
        "images": numbers["images"], "image_bytes": numbers["image_bytes"],
        "database_bytes": numbers["database_bytes"], "bytes": numbers["bytes"],
        "dropped": None,  # kept in the capturing process's memory (the service's metrics), not in the folder
        "records_with_feedback": with_feedback, "feedback": sum(by_source.values()), "feedback_by_source": by_source,
        "oldest": _capture_iso(oldest), "newest": _capture_iso(newest),
    }


def _cmd_capture(args: argparse.Namespace) -> int:
    import json

    command = args.capture_command
    options = {}
    if command == "purge":
        options = {"max_age_s": args.retention, "max_bytes": args.max_bytes}
    store = _capture_open(args, **options)
    try:
        if command == "stats":
            numbers = _capture_folder_stats(store)
            if args.json:
                print(json.dumps(numbers, indent=2, sort_keys=True))
            else:
                shown = dict(numbers, dropped="not kept in the folder (the capturing service counts them)",
                             feedback_by_source=", ".join(f"{k} {v}" for k, v in numbers["feedback_by_source"].items())
                             or "none")
                for key, value in shown.items():
                    print(f"{key:<22} {value}")
        elif command == "query":
            for record in store.query(**_capture_filters(args), limit=args.limit, after_id=args.after_id):
                print(json.dumps(_finite_or_none(record), sort_keys=True, ensure_ascii=False))
        elif command == "export":
            filters = {k: v for k, v in _capture_filters(args).items() if v is not None}
            if args.format == "parquet":
                rows = store.export_parquet(args.out, embeddings=not args.no_embeddings, **filters)
                print(f"wrote {rows} records to {_shown(args.out)}")
            else:
                done = store.export_imagefolder(args.out, labels=args.labels, include_special=args.include_special,
                                                **filters)
                print(f"wrote {done['images']} images to {_shown(args.out)} ({done['skipped']} records skipped: "
                      f"no image or no label)")
        elif command == "purge":
            removed = store.purge()
            print(f"removed {removed['records']} records, {removed['feedback']} feedback entries, {removed['images']} "
                  f"images no record names any more, {removed['orphans']} orphan files")
        elif command == "erase":
            erased = store.erase(prediction_id=args.prediction_id, subject=args.subject)
            print(f"erased {erased['records']} records, {erased['feedback']} feedback entries, {erased['images']} images")
            if not erased["records"]:
                print("speciesclf: warning: no record matched", file=sys.stderr)
    finally:
        store.close()
    return 0


def _add_capture_command(sub) -> None:
    capture = sub.add_parser(
        "capture", help="a capture folder (serve --capture DIR): numbers, queries, export for training, "
                        "retention and erasure (docs/capture.md)",
        description="Works on the folder directly; a service capturing into it may keep running (SQLite WAL).")
    csub = capture.add_subparsers(dest="capture_command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = csub.add_parser(name, help=text, description=text)
        p.add_argument("dir", metavar="DIR", help="the capture folder (holding records.sqlite3 and images/)")
        p.set_defaults(run=_one_line_errors(_cmd_capture))
        return p

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--since", type=_capture_time, metavar="WHEN",
                       help="records at or after WHEN: an ISO time (UTC unless it names a zone) or a duration ago "
                            "(24h, 7d)")
        p.add_argument("--until", type=_capture_time, metavar="WHEN", help="records before WHEN (as --since)")
        p.add_argument("--version", help="the model's version (1.0.0, or name@version)")
        p.add_argument("--arm", help="the rollout arm (primary, candidate, shadow)")
        p.add_argument("--label", help="the model's label (not people's: see feedback_label in each record)")
        unknown = p.add_mutually_exclusive_group()
        unknown.add_argument("--unknown", dest="unknown", action="store_const", const=True,
                             help="only answers of 'unknown'")
        unknown.add_argument("--known", dest="unknown", action="store_const", const=False,
                             help="only answers naming a label")
        feedback = p.add_mutually_exclusive_group()
        feedback.add_argument("--has-feedback", dest="has_feedback", action="store_const", const=True,
                              help="only records someone has labelled")
        feedback.add_argument("--no-feedback", dest="has_feedback", action="store_const", const=False,
                              help="only records nobody has labelled yet")

    p = command("stats", "records, images, bytes, feedback counts and the time span of the folder")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")

    p = command("query", "records matching the filters, in time order, one JSON object per line")
    filters(p)
    p.add_argument("--limit", type=_capture_limit, default=100, help="records printed, 1..10000")
    p.add_argument("--after-id", type=_capture_id, metavar="ID",
                   help="start after this prediction id (the last one of the previous page)")

    p = command("export", "records for training: an ImageFolder tree (DIR/<label>/<id>.<ext>) or a Parquet file")
    filters(p)
    p.add_argument("--format", choices=["imagefolder", "parquet"], default="imagefolder",
                   help="imagefolder: the images of labelled records, one folder per label; parquet: every "
                        "record with its feedback (needs pyarrow: pip install 'speciesclf[capture]')")
    p.add_argument("--out", required=True, metavar="PATH", help="the folder (imagefolder) or file (parquet) to write")
    p.add_argument("--labels", choices=["feedback", "model"], default="feedback",
                   help="imagefolder: people's resolved labels only, or the model's label where nobody gave one")
    p.add_argument("--include-special", action="store_true",
                   help="imagefolder: also write not_an_animal and unknown_species folders")
    p.add_argument("--no-embeddings", action="store_true", help="parquet: leave the embedding column out")

    p = command("purge", "enforce retention: remove records older than --retention, then the oldest until the "
                         "folder holds --max-bytes, then images no record names (orphans older than a minute)")
    p.add_argument("--retention", type=_capture_duration, metavar="AGE",
                   help="the maximum age of a record: 30d, 12h, 90m, 45s or 2w; default: no age limit")
    p.add_argument("--max-bytes", type=_capture_size, metavar="SIZE",
                   help="the most the folder may hold (images and database): 10GB, 500MB, 2GiB or bytes; "
                        "default: no size limit")

    p = command("erase", "remove one prediction, or everything of one subject: records, images, embeddings and "
                         "feedback, overwritten in the database file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prediction-id", type=_capture_id, metavar="ID", help="the prediction to erase")
    which.add_argument("--subject", metavar="S", help="erase every record of this client-supplied subject id")


def _capture_limit(text: str) -> int:
    value = _positive_int(text)
    if value > 10000:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..10000, got {value}")
    return value


# ------------------------------------------------------------------------------------------------
# `speciesclf serve` (the HTTP service). Self-contained: reached only through _add_serve_command().
# ------------------------------------------------------------------------------------------------


# ServeConfig fields the CLI sets, by their flag: the flags' values, and the words of ServeConfig's errors.
_SERVE_FLAGS = {
    "max_batch_size": "--max-batch-size", "batches_in_flight": "--batches-in-flight", "max_wait_ms": "--max-wait-ms",
    "max_queue": "--max-queue", "max_batch_request": "--max-batch-request", "default_timeout_ms": "--timeout-ms",
    "host": "--host", "port": "--port", "url_allow_hosts": "--url-allow-host",
    "url_allow_networks": "--url-allow-network", "rollout": "--rollout", "candidate": "--candidate",
    "admin_token_file": "--admin-token-file", "watch_interval_s": "--watch-interval", "registry": "--registry",
    "capture_dir": "--capture", "capture_rate": "--capture-rate", "capture_retention": "--retention",
    "capture_max_bytes": "--max-capture-bytes", "capture_consent": "--capture-consent",
    "capture_optional": "--capture-optional", "feedback_token_file": "--feedback-token-file",
}


def _serve_config_error(message: str) -> str:
    """ServeConfig's error in the words of the command line: its field names become the flags that set them,
    so the message names what the user can change."""
    for field, flag in _SERVE_FLAGS.items():
        # A bare word ("host") is a field only after "ServeConfig."; a name_with_underscores is one anywhere.
        prefix = r"(?:ServeConfig\.)?" if "_" in field else r"ServeConfig\."
        message = re.sub(rf"\b{prefix}{field}\b", flag, message)
    return message


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeConfig, ServeStartupError, run
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"speciesclf: error: serve needs the 'serve' extra (pip install 'speciesclf[serve]'): {e}",
              file=sys.stderr)
        return 1
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        # Only what was given on the command line: every default lives in ServeConfig, nowhere else.
        given = {field: getattr(args, field) for field in (
            "max_batch_size", "batches_in_flight", "max_wait_ms", "max_queue", "max_batch_request",
        ) if getattr(args, field) is not None}
        if args.timeout_ms is not None:
            given["default_timeout_ms"] = args.timeout_ms
        if args.watch_interval is not None:
            given["watch_interval_s"] = args.watch_interval
        for field, value in (("capture_rate", args.capture_rate), ("capture_retention", args.retention),
                             ("capture_max_bytes", args.max_capture_bytes), ("capture_consent", args.capture_consent)):
            if value is not None:
                given[field] = value
        config = ServeConfig(host=args.host, port=args.port, url_inputs=bool(args.url_allow_host),
                             url_allow_hosts=tuple(args.url_allow_host),
                             url_allow_networks=tuple(args.url_allow_network), rollout=args.rollout,
                             candidate=args.candidate, admin_token_file=args.admin_token_file,
                             registry=args.registry, capture_dir=args.capture, capture_optional=args.capture_optional,
                             feedback_token_file=args.feedback_token_file, **given)
        if args.candidate is not None or args.rollout is not None:
            from .serve._deployment import is_registry_reference, registry_of

            if not is_registry_reference(args.model, registry_of(config)):
                raise ValueError(f"--candidate and --rollout need --model to be a registry reference (name@production "
                                 f"or name@VERSION of a name in the registry), not {args.model!r}")
    except ValueError as e:
        print(f"speciesclf: error: {_serve_config_error(str(e))}", file=sys.stderr)
        return 1
    try:
        run(args.model, config, log_level=args.log_level, workers=args.workers)
    except ServeStartupError as e:  # after the server's own log lines: the reason is the last line
        print(f"speciesclf: error: serve did not start: {e}", file=sys.stderr)
        return 1
    return 0


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (needs the 'serve' extra)")
    p.add_argument("--model", default="species100",
                   help="bundle path, registry reference or built-in model (default: species100)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (0.0.0.0 for every interface, as in a container)")
    p.add_argument("--port", type=int, default=8000, help="the TCP port to listen on (0: any free port)")
    p.add_argument("--max-batch-size", type=int, help="images per inference call (default 16)")
    p.add_argument("--batches-in-flight", type=int,
                   help="batches decoded or inferred at once (default 1: one after another; 2 overlaps the "
                        "next batch's decoding with the current inference)")
    p.add_argument("--max-wait-ms", type=float, help="kept for compatibility: an idle worker dispatches at once, and "
                        "requests arriving during an inference form the next batch")
    p.add_argument("--max-queue", type=int, help="images waiting; beyond it requests get 429 (default 256; at least "
                                                 "--max-batch-request)")
    p.add_argument("--max-batch-request", type=int, help="images in one /v1/predict/batch request (default 64)")
    p.add_argument("--timeout-ms", type=int, help="default per-request deadline (default 10000)")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes, each loading the model with its own queue (default 1)")
    p.add_argument("--url-allow-host", action="append", default=[], metavar="HOST",
                   help="enable {'url': ...} inputs from HOST ('*.example.com', or '*' for any public host); "
                        "repeatable. Without it URL inputs are refused")
    p.add_argument("--url-allow-network", action="append", default=[], metavar="CIDR",
                   help="also allow URL hosts resolving inside CIDR (e.g. an internal image store); repeatable. "
                        "Private, loopback and link-local addresses are refused otherwise; metadata addresses always")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the lowest level logged, by the service's JSON lines and uvicorn's (default info; "
                        "warning drops the line per request)")
    # A rollout (docs/rollout.md): with --model name@production (a registry reference) the service follows
    # the registry's aliases; these choose what it does with a candidate.
    p.add_argument("--candidate", metavar="REF",
                   help="start a rollout of this version (1.1.0, or name@version|alias) beside --model at start-up, "
                        "unless the registry's rollout state already runs it")
    p.add_argument("--rollout", type=_rollout_spec, metavar="SPEC",
                   help="the rollout policy: canary[:5,25,50,100] (percent steps) or shadow[:SHARE]; used for "
                        "--candidate and when the registry alias 'candidate' is pointed at a version (default canary)")
    p.add_argument("--admin-token-file", metavar="FILE",
                   help="enable the admin API under /v1/admin/ with the bearer token in FILE (without it the admin "
                        "routes do not exist)")
    p.add_argument("--registry", metavar="DIR", help="the registry folder (default: $SPECIESCLF_HOME/registry)")
    # Capture and feedback (docs/serve.md, docs/capture.md): off unless --capture is given.
    p.add_argument("--capture", metavar="DIR",
                   help="capture predictions into the store in DIR (records, and the images senders consent to)")
    p.add_argument("--capture-rate", type=float, metavar="R",
                   help="the share of ordinary answers captured (default 0.1; unknowns, low scores and errors always)")
    p.add_argument("--retention", metavar="AGE", help="purge captures older than AGE: 30d, 12h, 90m or seconds "
                                                      "(default 30d)")
    p.add_argument("--max-capture-bytes", metavar="SIZE",
                   help="the capture store's budget, images and database: 10GB, 500MB, 2GiB (default 10GB)")
    p.add_argument("--capture-consent", choices=["required", "assumed"],
                   help="what a request that sends no consent means: required (store only its numbers; default) "
                        "or assumed")
    p.add_argument("--capture-optional", action="store_true",
                   help="if the capture store cannot be opened, serve without capture (one log line) instead of "
                        "failing to start")
    p.add_argument("--feedback-token-file", metavar="FILE",
                   help="enable POST /v1/feedback with the bearer token in FILE (needs --capture)")
    p.add_argument("--watch-interval", type=float, metavar="S",
                   help="seconds between looks at the registry's aliases (default 2; SIGHUP looks at once)")
    p.set_defaults(run=_cmd_serve)
