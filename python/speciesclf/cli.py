"""The ``speciesclf`` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _image_paths(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file()))
        else:
            found.append(p)
    return found


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speciesclf", description="Image classification as a component.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", help="save the batch as a .npy file")
    p.set_defaults(run=_cmd_preprocess)

    args = parser.parse_args(argv)
    return args.run(args)
