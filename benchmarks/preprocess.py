#!/usr/bin/env python3
"""Preprocessing throughput: speciesclf's native core against its Python twin, the torchvision recipe and
a libjpeg-turbo decode-only floor, all measured in the same run.

Every method turns encoded JPEG bytes held in memory into model input (resize shorter side 256, center
crop 224, ImageNet normalisation, float32 NCHW), except the decode-only floors, which only decode at full
size. File reading is never timed.

Methods (each at 1 thread and at all cores):
  native            speciesclf.preprocess_batch(..., backend="native", out=preallocated)
  python            speciesclf.preprocess_batch(..., backend="python", out=preallocated)
  pillow-reference  torchvision's Resize(256) / CenterCrop(224) / ToTensor / Normalize written out with
                    Pillow + torch ops, one image at a time (ThreadPoolExecutor(T) for T > 1), stacked into
                    a preallocated batch tensor
  decode-only (simplejpeg)        simplejpeg.decode_jpeg(b, colorspace="RGB"), full size
  decode-only (speciesclf.decode) speciesclf.decode(b, backend="native"), full size
  decode floor (native's DCT scale) speciesclf.decode(b, min_size=...), the whole frame decoded at the
                    reduced JPEG scale native picks for the default spec (1/8 on the 12 MP set, full size on
                    the shared photos): what any method pays that decodes at that scale, so
                    pillow-reference time / this time bounds the ratio the targets ask of native
  simplejpeg+opencv full-size simplejpeg decode, cv2.resize(INTER_AREA) to shorter side 256, crop,
                    NumPy float32 normalisation

torch and OpenCV are limited to one intra-op thread (torch.set_num_threads(1), cv2.setNumThreads(1)), as in
a DataLoader worker, so that "1 thread" means one core for every method; with T threads the per-image
methods run on a ThreadPoolExecutor(T) (Pillow, simplejpeg, OpenCV and speciesclf.decode release the GIL).

Data sets:
  shared photos  $SPECIESCLF_SHARED/images/imagenet-samples/*.JPEG (default ../shared from the repo root)
  12 MP          --n12mp of those photos (a fixed pseudo-random choice), center-cropped to 4:3, upscaled to
                 4032x3024 with Pillow's bicubic filter and saved as JPEG quality 90; cached in
                 benchmarks/_data/ (git-ignored)

Each measurement is repeated (--repeats, --repeats-12mp) with the methods interleaved round-robin inside
each repeat, so that a burst of load from elsewhere on the machine hits every method alike; the table
reports the median. Every method is warmed up once (one untimed pass over the whole set, or over the first
--warmup-items images) before timing, in each process and at each thread count.

This machine may be shared (builds, test runs): before each round the script waits, within
--max-wait seconds in all, until other processes use less than --idle-threshold cores, and it reports the
CPU other processes used during each round (from /proc/stat) next to the table; a round during which they
used more than --idle-threshold cores is left out of the medians and run again (at most --repeats extra
rounds; --no-retry keeps every round). Minor page faults per image are reported too.

pillow-reference is also timed alone in fresh child processes (skip with --no-fresh-reference): on 12 MP
images Pillow allocates ~48 MB per decode, and whether glibc malloc hands back already-mapped memory or maps
fresh pages (~24k page faults per image) depends on what the process did before, which the other methods
change. The in-process row runs under the same conditions as every other row; "pillow-reference (fresh
process)" is what a worker doing only that recipe pays with glibc's defaults; "pillow-reference (fresh,
malloc tuned)" runs with MALLOC_MMAP_THRESHOLD_=32 MiB and MALLOC_TRIM_THRESHOLD_=1 GiB, so the main
arena keeps and reuses that memory (at 1 thread the reference's best case; worker threads' arenas still map
fresh pages).

    python3 benchmarks/preprocess.py                    # full run, ~2-3 min on 2 cores (plus waits)
    python3 benchmarks/preprocess.py --quick            # ~30 s smoke run
    python3 benchmarks/preprocess.py --write-results    # also record the run in benchmarks/RESULTS.md
    python3 benchmarks/preprocess.py --json out.json    # also dump the raw numbers
"""

from __future__ import annotations

import argparse
import glob
import importlib
import io
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# the shared harness lives next to this script
from _harness import ForeignLoad, add_output_arguments, add_wait_arguments, finish, fmt  # noqa: E402
from _harness import import_speciesclf, loadavg, loadavg_line, log, machine_info, run_info, shared_dir  # noqa: E402
from _harness import median_and_spread, usable_cores  # noqa: E402

DATA_DIR = HERE / "_data"

SIZE, RESIZE = 224, 256
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
W12, H12, Q12 = 4032, 3024, 90

# --------------------------------------------------------------------------------------------- setup


def optional_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


# ------------------------------------------------------------------------------------------ data sets


def shared_photo_paths() -> list[Path]:
    folder = shared_dir() / "images" / "imagenet-samples"
    paths = sorted(Path(p) for p in glob.glob(str(folder / "*.JPEG")))
    if not paths:
        raise SystemExit(f"no *.JPEG under {folder}; set SPECIESCLF_SHARED")
    return paths


def source_megapixels(datas: list[bytes]) -> list[float]:
    sizes = []
    for b in datas:
        with Image.open(io.BytesIO(b)) as im:  # reads the header only
            sizes.append(im.size[0] * im.size[1] / 1e6)
    return sizes


def make_12mp(paths: list[Path], n: int, log: Callable[[str], None]) -> list[Path]:
    """The first n of a fixed shuffle of the photos, as cached 4032x3024 quality-90 JPEGs."""
    order = list(paths)
    random.Random(0).shuffle(order)
    chosen = order[: min(n, len(order))]
    folder = DATA_DIR / f"12mp_{W12}x{H12}_q{Q12}"
    folder.mkdir(parents=True, exist_ok=True)
    out, made, t0 = [], 0, time.perf_counter()
    for src in chosen:
        dst = folder / (src.stem + ".jpg")
        if not dst.exists():
            with Image.open(src) as im:
                im = im.convert("RGB")
                w, h = im.size
                # center-crop to 4:3 so the upscale does not distort, then bicubic to 4032x3024
                if w * 3 > h * 4:
                    cw, ch = h * 4 // 3, h
                else:
                    cw, ch = w, w * 3 // 4
                left, top = (w - cw) // 2, (h - ch) // 2
                big = im.resize((W12, H12), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
            tmp = dst.with_suffix(".tmp")
            big.save(tmp, format="JPEG", quality=Q12)
            tmp.replace(dst)
            made += 1
        out.append(dst)
    if made:
        log(f"[bench] generated {made} 12 MP images in {time.perf_counter() - t0:.1f} s under {folder}")
    return out


# ---------------------------------------------------------------------------------------------- methods


def torchvision_geometry(w: int, h: int) -> tuple[int, int, int, int]:
    """torchvision Resize(256) (shorter side) + CenterCrop(224): (new_w, new_h, left, top)."""
    if w <= h:
        nw, nh = RESIZE, int(RESIZE * h / w)
    else:
        nw, nh = int(RESIZE * w / h), RESIZE
    return nw, nh, int(round((nw - SIZE) / 2.0)), int(round((nh - SIZE) / 2.0))


class Methods:
    """Builds one callable per (method, threads): run(datas) processes the whole list once."""

    def __init__(self, speciesclf, torch, simplejpeg, cv2, max_threads: int, n_max: int):
        self.scl = speciesclf
        self.torch = torch
        self.simplejpeg = simplejpeg
        self.cv2 = cv2
        self.spec = speciesclf.PreprocessSpec() if speciesclf is not None else None
        self.pools = {t: ThreadPoolExecutor(t, thread_name_prefix=f"bench{t}") for t in range(2, max_threads + 1)}
        # preallocated, touched output buffers (one per method so outputs can be compared afterwards);
        # a reference-only instance (the fresh-process child) allocates only the reference's
        rows = n_max if speciesclf is not None else 0
        self.out_native = np.empty((rows, 3, SIZE, SIZE), np.float32)
        self.out_python = np.empty((rows, 3, SIZE, SIZE), np.float32)
        self.out_cv2 = np.empty((rows if cv2 is not None else 0, 3, SIZE, SIZE), np.float32)
        for a in (self.out_native, self.out_python, self.out_cv2):
            a.fill(0)
        self.out_ref = torch.zeros((n_max, 3, SIZE, SIZE), dtype=torch.float32) if torch is not None else None
        if torch is not None:
            self.t_mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
            self.t_std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
        self.np_mean = np.asarray(MEAN, np.float32)
        self.np_std = np.asarray(STD, np.float32)
        self.np_scale = (np.float32(1.0 / 255.0) / self.np_std).astype(np.float32)  # x/255/std
        self.np_shift = (self.np_mean / self.np_std).astype(np.float32)

    def _map(self, fn, datas, threads):
        if threads == 1:
            return [fn(x) for x in datas]
        return list(self.pools[threads].map(fn, datas))

    def available(self) -> list[str]:
        names = ["native", "python"]
        if self.torch is not None:
            names.append("pillow-reference")
        if self.simplejpeg is not None:
            names.append("decode-only (simplejpeg)")
        names.append("decode-only (speciesclf.decode)")
        names.append(DECODE_FLOOR)
        if self.simplejpeg is not None and self.cv2 is not None:
            names.append("simplejpeg+opencv")
        return names

    def runner(self, name: str, threads: int) -> Callable[[list[bytes]], None]:
        scl, spec = self.scl, self.spec
        if name == "native":
            out = self.out_native

            def run(datas):
                scl.preprocess_batch(datas, spec, threads=threads, backend="native", out=out[: len(datas)])

            return run
        if name == "python":
            out = self.out_python

            def run(datas):
                scl.preprocess_batch(datas, spec, threads=threads, backend="python", out=out[: len(datas)])

            return run
        if name == "pillow-reference":
            torch, mean, std, out = self.torch, self.t_mean, self.t_std, self.out_ref

            def one(b):
                img = Image.open(io.BytesIO(b)).convert("RGB")
                nw, nh, left, top = torchvision_geometry(*img.size)
                img = img.resize((nw, nh), Image.BILINEAR)
                img = img.crop((left, top, left + SIZE, top + SIZE))
                t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)
                return t.sub_(mean).div_(std)

            def run(datas):
                torch.stack(self._map(one, datas, threads), out=out[: len(datas)])

            return run
        if name == "decode-only (simplejpeg)":
            sj = self.simplejpeg

            def one(b):
                sj.decode_jpeg(b, colorspace="RGB")

            return lambda datas: self._map(one, datas, threads)
        if name == "decode-only (speciesclf.decode)":

            def one(b):
                scl.decode(b, backend="native")

            return lambda datas: self._map(one, datas, threads)
        if name == DECODE_FLOOR:
            margin = spec.jpeg_reduce_margin or 0.0
            sizes: dict[int, tuple[int, int]] = {}  # filled by the untimed warm-up pass

            def min_size(b: bytes) -> tuple[int, int]:
                key = id(b)
                if key not in sizes:
                    with Image.open(io.BytesIO(b)) as im:  # the header only; these photos are upright
                        nw, nh, _, _ = torchvision_geometry(*im.size)
                    # native keeps reduction r while width >= r * margin * nw (and the same for heights);
                    # decode(min_size=m) keeps it while width >= r * m
                    sizes[key] = (math.ceil(margin * nw), math.ceil(margin * nh)) if margin else (im.size)
                return sizes[key]

            def one(b):
                scl.decode(b, min_size=min_size(b), backend="native")

            return lambda datas: self._map(one, datas, threads)
        if name == "simplejpeg+opencv":
            sj, cv2, out = self.simplejpeg, self.cv2, self.out_cv2
            scale, shift = self.np_scale, self.np_shift

            def one(item):
                i, b = item
                img = sj.decode_jpeg(b, colorspace="RGB")
                h, w = img.shape[:2]
                nw, nh, left, top = torchvision_geometry(w, h)
                img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
                crop = img[top : top + SIZE, left : left + SIZE]
                x = crop.astype(np.float32)
                x *= scale
                x -= shift
                out[i] = x.transpose(2, 0, 1)

            return lambda datas: self._map(one, list(enumerate(datas)), threads)
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------- timing


def measure(
    methods: Methods,
    names: list[str],
    datas: list[bytes],
    threads: int,
    repeats: int,
    warmup_items: int,
    load: ForeignLoad,
    wait: Callable[[], None],
    threshold: float,
    extra_rounds: int,
):
    """Times every method over ``datas``, interleaved round-robin, until ``repeats`` rounds ran while other
    processes used less than ``threshold`` cores (or ``extra_rounds`` more rounds were spent trying).

    Returns (times {name: [s per round]}, minor page faults {name: [per image per round]}, [other processes'
    cores per round]).
    """
    runners = {name: methods.runner(name, threads) for name in names}
    warm = datas[:warmup_items] if warmup_items > 0 else datas
    for run in runners.values():
        run(warm)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}
    foreign: list[float] = []
    while sum(x < threshold for x in foreign) < repeats and len(foreign) < repeats + extra_rounds:
        wait()
        a = load.sample()
        for name, run in runners.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            run(datas)
            times[name].append(time.perf_counter() - t0)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(datas))
        foreign.append(load.cores(a, load.sample()))
    return times, faults, foreign


def parity(methods: Methods, datas: list[bytes]) -> dict:
    """Mean / max |method - pillow-reference| in 1/255 pixel units, on outputs of one fresh pass."""
    if methods.torch is None:
        return {}
    n = len(datas)
    methods.runner("pillow-reference", 1)(datas)
    ref = methods.out_ref[:n].numpy()
    std = np.asarray(STD, np.float32).reshape(1, 3, 1, 1) * 255.0
    result = {}
    for name, arr in (("native", methods.out_native), ("python", methods.out_python), ("simplejpeg+opencv", methods.out_cv2)):
        if name == "simplejpeg+opencv" and name not in methods.available():
            continue
        methods.runner(name, 1)(datas)
        diff = np.abs(arr[:n] - ref) * std
        result[name] = {"mean": float(diff.mean()), "max": float(diff.max())}
    return result


# --------------------------------------------------------------------------------------------- reporting


def summarize(times: list[float], faults: list[float], foreign: list[float], threshold: float, n: int, mp: float) -> dict:
    """Medians over the quiet rounds (all rounds if none was quiet); every round stays in the JSON."""
    quiet = [i for i, x in enumerate(foreign) if x < threshold] or list(range(len(times)))
    med, spread = median_and_spread(times, quiet)
    return {
        "times_s": times,
        "minor_faults_per_img": faults,
        "rounds_used": quiet,
        "median_s": med,
        "img_per_s": n / med,
        "mp_per_s": mp / med,
        "spread_pct": spread,
        "median_minor_faults_per_img": statistics.median(faults[i] for i in quiet),
    }


def table(results: dict, names: list[str], thread_counts: list[int]) -> str:
    lines = [
        "| Data set | Method | Threads | Median s | img/s | MP/s | × pillow-ref | time ÷ decode-only (simplejpeg) | × 1 thread | spread | faults/img |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ds in results["datasets"]:
        per_t = ds["results"]
        for name in names:
            for t in thread_counts:
                r = per_t.get(str(t), {}).get(name)
                if r is None:
                    continue
                ref = per_t[str(t)].get("pillow-reference")
                dec = per_t[str(t)].get("decode-only (simplejpeg)")
                one = per_t.get("1", {}).get(name)
                vs_ref = r["img_per_s"] / ref["img_per_s"] if ref else None
                vs_dec = r["median_s"] / dec["median_s"] if dec else None
                scale = r["img_per_s"] / one["img_per_s"] if (one and t != 1) else None
                lines.append(
                    f"| {ds['label']} | {name} | {t} | {r['median_s']:.3f} | {fmt(r['img_per_s'], 1)} | "
                    f"{fmt(r['mp_per_s'], 1)} | {fmt(vs_ref)} | {fmt(vs_dec)} | {fmt(scale)} | "
                    f"{r['spread_pct']:.0f}% | {r['median_minor_faults_per_img']:,.0f} |"
                )
    return "\n".join(lines)


def ratio(results: dict, key: str, t: int, name_a: str, name_b: str, what: str) -> float | None:
    for ds in results["datasets"]:
        if ds["key"] != key:
            continue
        a = ds["results"].get(str(t), {}).get(name_a)
        b = ds["results"].get(str(t), {}).get(name_b)
        if a is None or b is None:
            return None
        return a["img_per_s"] / b["img_per_s"] if what == "throughput" else a["median_s"] / b["median_s"]
    return None


def scaling(results: dict, key: str, name: str, t: int) -> float | None:
    for ds in results["datasets"]:
        if ds["key"] == key:
            a, b = ds["results"].get(str(t), {}).get(name), ds["results"].get("1", {}).get(name)
            if a and b:
                return a["img_per_s"] / b["img_per_s"]
    return None


def ratio_lines(results: dict, thread_counts: list[int]) -> tuple[list[str], list[str], dict]:
    """(informational ratio lines, target check lines, raw ratios)."""
    multi = [t for t in thread_counts if t > 1]
    raw: dict[str, float | None] = {}
    info = []
    for key, label in (("shared", "shared photos"), ("12mp", "12 MP")):
        if not any(ds["key"] == key for ds in results["datasets"]):
            continue
        for t in thread_counts:
            r1 = ratio(results, key, t, "native", "pillow-reference", "throughput")
            r2 = ratio(results, key, t, "native", "decode-only (simplejpeg)", "time")
            r3 = ratio(results, key, t, "native", "decode-only (speciesclf.decode)", "time")
            r4 = ratio(results, key, t, "native", "python", "throughput")
            r5 = ratio(results, key, t, "native", FRESH_REFERENCE, "throughput")
            r6 = ratio(results, key, t, "native", TUNED_REFERENCE, "throughput")
            raw[f"{key}/t{t}/native_vs_pillow_reference"] = r1
            raw[f"{key}/t{t}/native_vs_pillow_reference_fresh_process"] = r5
            raw[f"{key}/t{t}/native_vs_pillow_reference_fresh_malloc_tuned"] = r6
            raw[f"{key}/t{t}/native_time_over_decode_simplejpeg"] = r2
            raw[f"{key}/t{t}/native_time_over_decode_speciesclf"] = r3
            raw[f"{key}/t{t}/native_vs_python"] = r4
            r7 = ratio(results, key, t, DECODE_FLOOR, "pillow-reference", "throughput")
            r8 = ratio(results, key, t, "native", DECODE_FLOOR, "time")
            raw[f"{key}/t{t}/decode_floor_vs_pillow_reference"] = r7
            raw[f"{key}/t{t}/native_time_over_decode_floor"] = r8
            info.append(
                f"- {label}, {t} thread{'s' if t > 1 else ''}: native = {fmt(r1)}× pillow-reference"
                + (f" ({fmt(r5)}× in a fresh process, {fmt(r6)}× fresh with malloc tuned)" if r5 is not None else "")
                + ", "
                f"{fmt(r4)}× python backend; native time = {fmt(r2)}× decode-only (simplejpeg), "
                f"{fmt(r3)}× decode-only (speciesclf.decode), {fmt(r8)}× the decode floor at native's DCT scale, "
                f"which alone is {fmt(r7)}× pillow-reference (the most any method decoding at that scale can reach)"
            )
        for t in multi:
            s = scaling(results, key, "native", t)
            raw[f"{key}/native_scaling_t{t}"] = s
            info.append(f"- {label}: native {t} threads = {fmt(s)}× native 1 thread")

    def check(
        text: str,
        value: float | None,
        target: float,
        higher_is_better: bool,
        key: str | None = None,
        busy_blocks: list[str] = (),
    ) -> str:
        if value is None:
            return f"- {text}: not measured"

        def verdict(x: float) -> str:
            return "PASS" if (x >= target if higher_is_better else x <= target) else "MISS"

        line = f"- {text}: measured {value:.2f}× — {verdict(value)}"
        if key is not None:
            alt = [
                f"{what}: {x:.2f}× — {verdict(x)}"
                for what, x in (
                    ("fresh process", raw.get(f"{key}_fresh_process")),
                    ("fresh process, malloc tuned", raw.get(f"{key}_fresh_malloc_tuned")),
                )
                if x is not None
            ]
            if alt:
                line += " (pillow-reference timed alone in a " + "; ".join(alt) + ")"
        if key is not None and key.endswith("native_vs_pillow_reference"):
            bound = raw.get(key.replace("native_vs_pillow_reference", "decode_floor_vs_pillow_reference"))
            if bound is not None:
                line += (f"; the decode floor alone (whole frame at native's DCT scale, no resize) is {bound:.2f}×"
                         f"{', below the target' if bound < target else ''}")
        if busy_blocks:
            line += f" [WARNING: other processes kept the machine busy during {', '.join(busy_blocks)}; not a clean measurement]"
        return line

    def busy(key: str, *threads: int) -> list[str]:
        """The (data set, threads) blocks behind a check whose medians include no quiet round."""
        out = []
        for ds in results["datasets"]:
            if ds["key"] != key:
                continue
            for t in threads:
                v = ds.get("foreign_cores", {}).get(str(t))
                if v and min(v) >= results["idle_threshold"]:
                    out.append(f"{ds['label']} {t}T")
        return out

    checks = [
        check(
            "native >= 2.5x pillow-reference (shared photos, 1 thread)",
            raw.get("shared/t1/native_vs_pillow_reference"),
            2.5,
            True,
            "shared/t1/native_vs_pillow_reference",
            busy("shared", 1),
        ),
        check(
            "native time <= 1.35x decode-only (shared photos, 1 thread)",
            raw.get("shared/t1/native_time_over_decode_simplejpeg"),
            1.35,
            False,
            None,
            busy("shared", 1),
        ),
        check(
            "native >= 8x pillow-reference (12 MP, 1 thread)",
            raw.get("12mp/t1/native_vs_pillow_reference"),
            8.0,
            True,
            "12mp/t1/native_vs_pillow_reference",
            busy("12mp", 1),
        ),
    ]
    if 2 in thread_counts:
        for key, label in (("shared", "shared photos"), ("12mp", "12 MP")):
            if f"{key}/native_scaling_t2" in raw:
                checks.append(
                    check(
                        f"2 threads >= 1.8x 1 thread (native, {label})",
                        raw.get(f"{key}/native_scaling_t2"),
                        1.8,
                        True,
                        None,
                        busy(key, 1, 2),
                    )
                )
    else:
        checks.append("- 2 threads >= 1.8x 1 thread: not measured (fewer than 2 usable cores)")
    return info, checks, raw


def render(results: dict, names: list[str], thread_counts: list[int], info: list[str], checks: list[str]) -> str:
    ds_lines = [
        f"- {ds['label']}: {ds['n']} images, {ds['megapixels']:.1f} MP in all, {ds['mean_kb']:.0f} KiB per file on "
        f"average, {ds['description']}; "
        f"{ds['repeats']} repeats"
        for ds in results["datasets"]
    ]
    out = [*ds_lines, "", table(results, names, thread_counts), "", "Ratios (same run):", *info, "", "Target checks:", *checks]
    par = results.get("parity") or {}
    if par:
        out += [
            "",
            "Output difference vs pillow-reference (mean / max, 1/255 pixel units, shared photos; the default spec's "
            f"jpeg_reduce_margin={results['spec'].get('jpeg_reduce_margin')} lets native and python decode large "
            "JPEGs at reduced scale, so they are close to, not bit-exact with, the reference):",
        ]
        out += [f"- {k}: {v['mean']:.3f} / {v['max']:.2f}" for k, v in par.items()]
    notes = []
    for ds in results["datasets"]:
        for t, v in ds.get("foreign_cores", {}).items():
            if not v:
                continue
            used = next(iter(ds["results"][t].values()))["rounds_used"]
            dropped = len(v) - len(used) if len(used) < len(v) else 0
            worst = max(v[i] for i in used)
            notes.append(
                f"{ds['label']} {t}T: {worst:.2f}" + (f" ({dropped} busy round(s) left out and rerun)" if dropped else "")
            )
            if worst >= results["idle_threshold"]:
                notes[-1] += " — WARNING: no quiet round, treat these rows with caution"
            for label, _ in FRESH_VARIANTS:
                fresh = ds["results"][t].get(label)
                if fresh:
                    fv = fresh["foreign_cores"]
                    fw = max(fv[i] for i in fresh["rounds_used"])
                    notes.append(
                        f"{ds['label']} {t}T {label}: {fw:.2f}"
                        + (" — WARNING: no quiet round" if fw >= results["idle_threshold"] else "")
                    )
    out += [
        "",
        "CPU used by other processes during the rounds behind the medians (cores, worst round): " + "; ".join(notes) + ".",
        "Spread = (max - min) / median over those rounds; faults/img = minor page faults per image (median), "
        "i.e. fresh memory the allocator had to map (for pillow-reference on large images this depends on "
        "glibc malloc's state, so it can differ between processes; every round's value is in --json).",
        loadavg_line(results),
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------ fresh-process reference

DECODE_FLOOR = "decode floor (native's DCT scale)"
FRESH_REFERENCE = "pillow-reference (fresh process)"
TUNED_REFERENCE = "pillow-reference (fresh, malloc tuned)"
FRESH_VARIANTS = (
    (FRESH_REFERENCE, {}),
    (TUNED_REFERENCE, {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}),
)


def child_reference(job_path: str) -> int:
    """The --child-reference mode: times pillow-reference alone in this new process; JSON on stdout.

    Pillow's large per-image allocations cost a different amount of page faulting depending on the state
    glibc malloc is in, which the other methods in the main process change. A process that does nothing
    but the reference (like a DataLoader worker) shows what that recipe costs on its own.
    """
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    torch = importlib.import_module("torch")
    torch.set_num_threads(1)
    datas = [Path(p).read_bytes() for p in job["paths"]]
    methods = Methods(None, torch, None, None, max(job["threads"]), len(datas))
    load, budget = ForeignLoad(), [float(job["max_wait"])]

    def log(msg: str) -> None:
        print(msg.replace("[bench]", "[bench child]"), file=sys.stderr, flush=True)

    out = {}
    for t in job["threads"]:
        times, faults, foreign = measure(
            methods,
            ["pillow-reference"],
            datas,
            t,
            job["repeats"],
            job["warmup_items"],
            load,
            lambda: load.wait_idle(budget, job["idle_threshold"], log),
            job["idle_threshold"],
            job["extra_rounds"],
        )
        out[str(t)] = {"times": times["pillow-reference"], "faults": faults["pillow-reference"], "foreign": foreign}
    print(json.dumps({"results": out, "budget_left": budget[0]}))
    return 0


def run_fresh_reference(
    paths: list[Path], threads: list[int], repeats: int, args, budget: list[float], env: dict[str, str]
) -> dict:
    job = {
        "paths": [str(p) for p in paths],
        "threads": threads,
        "repeats": repeats,
        "warmup_items": args.warmup_items,
        "idle_threshold": args.idle_threshold,
        "max_wait": budget[0],
        "extra_rounds": 0 if args.no_retry else repeats,
    }
    job_path = DATA_DIR / f"fresh-reference-job-{os.getpid()}.json"
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job), encoding="utf-8")
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child-reference", str(job_path)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env},
        )
    finally:
        job_path.unlink(missing_ok=True)
    result = json.loads(proc.stdout)
    budget[0] = result["budget_left"]
    return result["results"]


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement, shared photos (default 5; --quick 2)")
    p.add_argument("--repeats-12mp", type=int, default=None, help="repeats per measurement, 12 MP set (default 3; --quick 1)")
    p.add_argument("--n12mp", type=int, default=None, help="photos in the 12 MP set (default 40; --quick 6)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N shared photos (default all; --quick 120)")
    p.add_argument(
        "--warmup-items", type=int, default=0, help="images in each method's warm-up call (default 0: the whole set)"
    )
    add_wait_arguments(p)
    p.add_argument("--no-retry", action="store_true", help="keep every round, quiet or not, and run no extra rounds")
    p.add_argument("--no-12mp", action="store_true", help="skip the 12 MP data set")
    add_output_arguments(p, "a ~30 s smoke run with smaller sets and fewer repeats")
    p.add_argument(
        "--no-fresh-reference",
        action="store_true",
        help="skip the two extra pillow-reference measurements in separate processes",
    )
    p.add_argument("--child-reference", metavar="JOB", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_reference:
        return child_reference(args.child_reference)
    repeats = args.repeats or (2 if args.quick else 5)
    repeats12 = args.repeats_12mp or (1 if args.quick else 3)
    n12 = args.n12mp if args.n12mp is not None else (6 if args.quick else 40)
    if args.max_wait is None:
        args.max_wait = 10.0 if args.quick else 60.0
    limit = args.limit if args.limit is not None else (120 if args.quick else None)
    if min(repeats, repeats12) < 1 or n12 < 0:
        p.error("repeats must be >= 1 and --n12mp >= 0")

    t_start = time.perf_counter()
    load_before = loadavg()
    scl = import_speciesclf()
    torch = optional_import("torch")
    simplejpeg = optional_import("simplejpeg")
    cv2 = optional_import("cv2")
    if torch is not None:
        torch.set_num_threads(1)
    else:
        log("[bench] torch not importable: pillow-reference skipped")
    if cv2 is not None:
        cv2.setNumThreads(1)
    if simplejpeg is None:
        log("[bench] simplejpeg not importable: decode-only (simplejpeg) and simplejpeg+opencv skipped")
    elif cv2 is None:
        log("[bench] cv2 not importable: simplejpeg+opencv skipped")

    cores = usable_cores()
    thread_counts = sorted({1, cores} | ({2} if cores >= 2 else set()))

    photos = shared_photo_paths()
    if limit:
        photos = photos[:limit]
    shared = [path.read_bytes() for path in photos]
    sets = [
        {
            "key": "shared",
            "label": "shared photos",
            "datas": shared,
            "paths": photos,
            "repeats": repeats,
            "description": f"{shared_dir() / 'images' / 'imagenet-samples'}/*.JPEG"
            + (f" (first {limit})" if limit else ""),
        }
    ]
    if not args.no_12mp and n12 > 0:
        big_paths = make_12mp(shared_photo_paths(), n12, log)
        big = [path.read_bytes() for path in big_paths]
        sets.append(
            {
                "key": "12mp",
                "label": "12 MP",
                "datas": big,
                "paths": big_paths,
                "repeats": repeats12,
                "description": f"{W12}x{H12} JPEG q{Q12} (bicubic upscale of shared photos, cached in benchmarks/_data/)",
            }
        )

    load = ForeignLoad()
    budget = [float(args.max_wait)]

    def wait() -> None:
        load.wait_idle(budget, args.idle_threshold, log)

    methods = Methods(scl, torch, simplejpeg, cv2, max(thread_counts), max(len(s["datas"]) for s in sets))
    names = methods.available()
    # fail early (and loudly) if an input does not go through the native path
    check = scl.preprocess_batch(shared, methods.spec, threads=cores, backend="native", on_error="skip", out=methods.out_native[: len(shared)])
    if not check.all_ok:
        log(f"[bench] warning: native failed on {len(check.errors)} shared photos: {list(check.errors.items())[:3]}")

    results: dict[str, Any] = {
        **run_info(argv),
        "machine": machine_info(scl, {"torch": torch, "simplejpeg": simplejpeg, "opencv": cv2}),
        "spec": {k: v for k, v in methods.spec.to_dict().items() if k not in ("max_pixels", "max_bytes")},
        "thread_counts": thread_counts,
        "methods": names,
        "loadavg_before": load_before,
        "idle_threshold": args.idle_threshold,
        "datasets": [],
    }
    results["parity"] = parity(methods, shared)

    for s in sets:
        datas = s["datas"]
        mps = source_megapixels(datas)
        ds = {k: v for k, v in s.items() if k not in ("datas", "paths")}
        ds.update(n=len(datas), megapixels=sum(mps), mean_kb=sum(map(len, datas)) / len(datas) / 1024, results={})
        for t in thread_counts:
            t0 = time.perf_counter()
            extra = s["repeats"] if not args.no_retry else 0
            times, faults, foreign = measure(
                methods, names, datas, t, s["repeats"], args.warmup_items, load, wait, args.idle_threshold, extra
            )
            ds["results"][str(t)] = {
                name: summarize(times[name], faults[name], foreign, args.idle_threshold, len(datas), sum(mps))
                for name in names
            }
            ds.setdefault("foreign_cores", {})[str(t)] = foreign
            log(
                f"[bench] {s['label']}, {t} thread(s): {time.perf_counter() - t0:.1f} s; other processes used "
                f"{', '.join(f'{x:.2f}' for x in foreign)} cores during the rounds"
            )
        for label, env in FRESH_VARIANTS if torch is not None and not args.no_fresh_reference else ():
            t0 = time.perf_counter()
            fresh = run_fresh_reference(s["paths"], thread_counts, s["repeats"], args, budget, env)
            for t, r in fresh.items():
                row = summarize(r["times"], r["faults"], r["foreign"], args.idle_threshold, len(datas), sum(mps))
                row.update(foreign_cores=r["foreign"], env=env)
                ds["results"][t][label] = row
            log(f"[bench] {s['label']}, {label}: {time.perf_counter() - t0:.1f} s")
        results["datasets"].append(ds)

    results["loadavg_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - t_start
    info, checks, raw = ratio_lines(results, thread_counts)
    results["ratios"] = raw
    results["checks"] = checks
    if any(FRESH_REFERENCE in r for ds in results["datasets"] for r in ds["results"].values()):
        names = [*names[:3], *(label for label, _ in FRESH_VARIANTS), *names[3:]]
    body = render(results, names, thread_counts, info, checks)
    details = [
        f"- Spec: speciesclf.PreprocessSpec() defaults ({results['spec']})",
        "- Medians over the repeats, methods interleaved round-robin, one untimed warm-up pass each; encoded bytes in "
        "memory; torch and OpenCV limited to 1 intra-op thread, T > 1 via ThreadPoolExecutor(T) for the "
        "per-image methods. MP/s counts source-image megapixels. The `pillow-reference (fresh …)` rows time the "
        "same recipe alone in a child process, with glibc malloc defaults or with MALLOC_MMAP_THRESHOLD_=32 MiB and "
        "MALLOC_TRIM_THRESHOLD_=1 GiB (see the script's docstring); `× pillow-ref` is always relative to the "
        f"in-process row. The run took {results['wall_s']:.0f} s.",
    ]
    finish(results, body, args, "preprocess.py — preprocessing throughput", details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
