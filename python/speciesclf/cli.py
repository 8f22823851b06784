"""The ``speciesclf`` command."""

from __future__ import annotations

import argparse
import math
import os
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
    CUDA errors, OSError unreadable or unwritable files. Every subcommand but info and serve uses it.
    """

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BrokenPipeError:
            raise  # the reader went away (| head): main() ends quietly
        except (ValueError, RuntimeError, OSError) as e:
            print(f"speciesclf: error: {e}", file=sys.stderr)
            return 1

    return wrapped


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    print(format_info(info(), as_json=args.json))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .preprocess import preprocess_batch
    from .spec import PreprocessSpec

    paths = _image_paths(args.paths)
    spec = PreprocessSpec(size=args.size, resize=args.resize or None, dtype=args.dtype, layout=args.layout)
    start = time.perf_counter()
    batch = preprocess_batch(paths, spec, backend=args.backend, threads=args.threads, on_error="skip")
    elapsed = time.perf_counter() - start
    for i, error in sorted(batch.errors.items()):
        print(f"{paths[i]}: {type(error).__name__}: {error}", file=sys.stderr)
    print(
        f"{int(batch.ok.sum())}/{len(paths)} images -> array {tuple(batch.array.shape)} {batch.array.dtype} "
        f"in {elapsed * 1000:.0f} ms ({len(paths) / max(elapsed, 1e-9):.0f} img/s)"
    )
    if args.output:
        import numpy as np

        np.save(args.output, batch.array)
    return 0 if batch.all_ok else 1


def _cmd_classify(args: argparse.Namespace) -> int:
    import csv
    import json

    from .classifier import Classifier

    problems: list[str] = []
    paths = _image_paths(args.paths, problems)
    for problem in problems:
        print(f"speciesclf: warning: {problem}", file=sys.stderr)
    if not paths:
        print("speciesclf: error: no images found", file=sys.stderr)
        return 1
    # Errors (no such model, no GPU, a model that is not valid ONNX, ...) reach _one_line_errors.
    clf = Classifier.load(args.model, device=args.device, batch_size=args.batch_size, threads=args.threads,
                          precision=args.precision)
    # The progress line goes to stderr; on the terminal that also shows the rows it would mix with them.
    progress = sys.stderr.isatty() and not sys.stdout.isatty() and not args.quiet
    failed = 0
    writer = csv.writer(sys.stdout) if args.format == "csv" else None
    if writer:
        writer.writerow(["file", "label", "scientific_name", "score", "unknown", "top_k", "error"])
    for i, p in enumerate(clf.predict_iter(paths, top_k=args.top_k, progress=progress)):
        name = _shown(paths[i])
        failed += not p.ok
        error = f"{type(p.error).__name__}: {p.error}" if p.error else ""
        top = "; ".join(f"{label} {score:.3f}" for label, score in p.top_k)
        if args.format == "json":
            print(json.dumps(_finite_or_none({"file": name, **p.to_dict()}), allow_nan=False))
        elif writer:
            writer.writerow([name, p.label or "", p.scientific_name or "", "" if p.score is None else f"{p.score:.4f}",
                             p.unknown, top, error])
        else:
            label = _one_line(error) or ("unknown" if p.unknown else p.label)
            score = "" if p.score is None else f"{p.score:.3f}"
            print(f"{_one_line(name):<50} {label:<32} {score:>6}  {'' if p.error else top}")
    if failed:
        print(f"{failed} of {len(paths)} images could not be classified", file=sys.stderr)
    return 1 if failed or problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speciesclf", description="Image classification as a component.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify images (files or folders) with a model")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", default="species100",
                   help="bundle path, registry reference (name@version|alias) or built-in model (default: species100)")
    p.add_argument("--top-k", type=_positive_int, default=3)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (GPU decoding and inference)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="inference dtype of torch models (fp16/bf16 on GPUs)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress line on a terminal")
    p.set_defaults(run=_one_line_errors(_cmd_classify))

    p = sub.add_parser("info", help="version, native module, codecs, threads, CUDA")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("preprocess", help="decode, resize, crop and normalise images into one batch")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--resize", type=int, default=256, help="shorter side before the crop; 0 squashes")
    p.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="float32")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW")
    p.add_argument("--backend", choices=["auto", "native", "python"], default="auto")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--output", help="save the batch as a .npy file")
    p.set_defaults(run=_one_line_errors(_cmd_preprocess))

    _add_bundle_registry_commands(sub)
    _add_serve_command(sub)

    args = parser.parse_args(argv)
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
    from .bundle import UnknownRule, create_bundle
    from .spec import PreprocessSpec

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
    import json

    from .bundle import Bundle

    with Bundle.open(args.path, verify=False) as bundle:
        if args.json:
            print(json.dumps(bundle.manifest.to_dict(), sort_keys=True, indent=2, ensure_ascii=False))
        else:
            print(_bundle_summary(bundle))
    return 0


def _cmd_bundle_verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    with Bundle.open(args.path, verify=True) as bundle:
        print(f"{bundle.ref}: ok (sha256 {bundle.manifest.model_sha256})")
    return 0


def _registry(args: argparse.Namespace):
    from .registry import Registry

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
    from .spec import PreprocessSpec

    defaults = PreprocessSpec()

    bundle = sub.add_parser("bundle", help="create, inspect and verify model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)

    p = bsub.add_parser("create", help="write a bundle directory (or .zip) from a model file and labels")
    p.add_argument("out", help="the bundle directory to create, or a path ending in .zip")
    p.add_argument("--model", required=True, help="model file (.onnx, .pt, .pt2)")
    p.add_argument("--labels", required=True, help="labels TSV: index<TAB>name[<TAB>scientific_name]")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    p.add_argument("--framework", choices=["onnx", "torchscript", "torch-export"], help="default: from the suffix")
    p.add_argument("--size", type=int, default=defaults.size)
    p.add_argument("--resize", type=int, default=defaults.resize, help="shorter side before the crop; 0 squashes")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"))
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"))
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], default=defaults.interpolation)
    p.add_argument("--dtype", choices=["float32", "float16", "uint8"], default=defaults.dtype)
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default=defaults.layout)
    p.add_argument("--output-kind", choices=["logits", "probabilities"], default="logits")
    p.add_argument("--num-outputs", type=int)
    p.add_argument("--label-subset", type=_index_list, help="comma-separated model output indices to keep")
    p.add_argument("--unknown-method", choices=["subset_mass", "max_probability"])
    p.add_argument("--unknown-threshold", type=float)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--metric", type=_metric_pair, action="append", metavar="KEY=VALUE")
    p.add_argument("--parent-version")
    p.add_argument("--training-data")
    p.add_argument("--notes", default="")
    p.add_argument("--link", action="store_true", help="hard-link the model instead of copying it (if possible)")
    p.set_defaults(run=_one_line_errors(_cmd_bundle_create))

    p = bsub.add_parser("inspect", help="print a bundle's manifest")
    p.add_argument("path", help="bundle directory or .zip")
    p.add_argument("--json", action="store_true", help="the full manifest as JSON")
    p.set_defaults(run=_one_line_errors(_cmd_bundle_inspect))

    p = bsub.add_parser("verify", help="check a bundle: manifest, labels and the model's sha256")
    p.add_argument("path", help="bundle directory or .zip")
    p.set_defaults(run=_one_line_errors(_cmd_bundle_verify))

    # --root is accepted both before and after the registry subcommand.
    root_help = "registry root (default: $SPECIESCLF_HOME/registry, see speciesclf.registry.default_home)"
    registry = sub.add_parser("registry", help="the local bundle registry: versions and aliases")
    registry.add_argument("--root", default=None, help=root_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=root_help)
    rsub = registry.add_subparsers(dest="registry_command", required=True)

    p = rsub.add_parser("list", parents=[common], help="names, versions and aliases")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_one_line_errors(_cmd_registry_list))

    p = rsub.add_parser("register", parents=[common], help="copy a bundle into the registry")
    p.add_argument("path", help="bundle directory or .zip")
    p.add_argument("--alias", action="append", help="also point this alias at it (repeatable)")
    p.set_defaults(run=_one_line_errors(_cmd_registry_register))

    p = rsub.add_parser("alias", parents=[common], help="point NAME@ALIAS at VERSION")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", nargs="?")
    p.add_argument("--remove", action="store_true", help="remove the alias instead")
    p.set_defaults(run=_one_line_errors(_cmd_registry_alias))

    p = rsub.add_parser("resolve", parents=[common], help="print the bundle directory of name[@version|@alias]")
    p.add_argument("ref")
    p.set_defaults(run=_one_line_errors(_cmd_registry_resolve))

    p = rsub.add_parser("delete", parents=[common], help="remove NAME@VERSION (refused while an alias uses it)")
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(run=_one_line_errors(_cmd_registry_delete))


# ------------------------------------------------------------------------------------------------
# `speciesclf serve` (the HTTP service). Self-contained: reached only through _add_serve_command().
# ------------------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeConfig, run
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
        given = {field: getattr(args, option) for option, field in (
            ("max_batch_size", "max_batch_size"), ("batches_in_flight", "batches_in_flight"),
            ("max_wait_ms", "max_wait_ms"), ("max_queue", "max_queue"), ("timeout_ms", "default_timeout_ms"),
        ) if getattr(args, option) is not None}
        config = ServeConfig(host=args.host, port=args.port, url_inputs=bool(args.url_allow_host),
                             url_allow_hosts=tuple(args.url_allow_host),
                             url_allow_networks=tuple(args.url_allow_network), **given)
    except ValueError as e:
        print(f"speciesclf: error: {e}", file=sys.stderr)
        return 1
    run(args.model, config, log_level=args.log_level, workers=args.workers)
    return 0


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (needs the 'serve' extra)")
    p.add_argument("--model", default="species100",
                   help="bundle path, registry reference or built-in model (default: species100)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, help="images per inference call (default 16)")
    p.add_argument("--batches-in-flight", type=int,
                   help="batches decoded or inferred at once (default 1: one after another; 2 overlaps the "
                        "next batch's decoding with the current inference)")
    p.add_argument("--max-wait-ms", type=float, help="kept for compatibility: an idle worker dispatches at once, and "
                        "requests arriving during an inference form the next batch")
    p.add_argument("--max-queue", type=int, help="images waiting; beyond it requests get 429 (default 256)")
    p.add_argument("--timeout-ms", type=int, help="default per-request deadline (default 10000)")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes, each loading the model with its own queue (default 1)")
    p.add_argument("--url-allow-host", action="append", default=[], metavar="HOST",
                   help="enable {'url': ...} inputs from HOST ('*.example.com', or '*' for any public host); "
                        "repeatable. Without it URL inputs are refused")
    p.add_argument("--url-allow-network", action="append", default=[], metavar="CIDR",
                   help="also allow URL hosts resolving inside CIDR (e.g. an internal image store); repeatable. "
                        "Private, loopback and link-local addresses are refused otherwise; metadata addresses always")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=_cmd_serve)
