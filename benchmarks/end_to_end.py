#!/usr/bin/env python3
"""End-to-end throughput: encoded JPEG bytes in memory -> top-5 predictions, speciesclf's Classifier against
the hand-written Pillow + ONNX Runtime pipelines it replaces, all measured in the same run.

Every method classifies the same images with the same model (MobileNetV2 int8, ONNX Runtime CPU provider) on
the same number of threads (2, "both cores"). File reading is never timed.

Methods:
  speciesclf predict_batch   Classifier.load(model, labels="imagenet1k", batch_size=64, threads=2), then
                             clf.predict_batch(list_of_bytes): Prediction objects with top-5 labels (its
                             ONNX Runtime runs each batch of 64 in parts of 8 images, two side by side on a
                             second, single-threaded session: its default on CPUs)
  per-image loop             one image at a time: the Pillow recipe below, ORT at batch 1, softmax + top-5
  batched Pillow + ORT       the Pillow recipe for 64 images into a preallocated (64, 3, 224, 224) buffer,
                             either sequentially in one thread ("sequential") or on a ThreadPoolExecutor(2)
                             ("2-thread pool"), then one ORT run per batch and softmax + top-5 for the batch;
                             the faster variant is the peer the targets compare with
  ORT on ready tensors       ORT alone on pre-made float32 (64, 3, 224, 224) batches (the last one 419 - 6*64
                             = 35 images) covering every image, one run per batch; and the same batches run
                             8 images at a time ("8 per run"), which ORT does faster on this CPU (its
                             activations stay in cache); and 4 images per run in a session with
                             intra_op_num_threads=1, two such runs at once on a ThreadPoolExecutor(2)
                             ("2 single-thread runs at once": no intra-op thread pool, no spin-waiting).
                             The fastest of these is the ceiling for any pipeline with this model, and the
                             one the target uses
  (diagnostic) speciesclf preprocess only
                             speciesclf.preprocess_batch(chunk of 64, clf.spec, threads=2) for every chunk,
                             no inference: with the ORT ceiling it tells how much predict_batch overlaps its
                             two stages
  (diagnostic) decode only   speciesclf.decode(b) for every image on a ThreadPoolExecutor(2), full size (the
                             scale native preprocessing decodes these photos at): the codec's floor under
                             any preprocessing, which bounds what predict_batch can reach

The Pillow recipe is torchvision's Resize(256) / CenterCrop(224) / ToTensor / Normalize written out:
Image.open(BytesIO).convert("RGB"), resize the shorter side to 256 with Image.BILINEAR (the longer side to
int(256 * long / short)), crop 224x224 at int(round((W - 224) / 2.0)), int(round((H - 224) / 2.0)), / 255,
ImageNet mean/std in float32, HWC -> CHW. Every ORT session the script makes has intra_op_num_threads=2 but
the one named above.

Each method runs once untimed over all the images first (warm-up; --quick: over the first 128), then the
methods are timed in rounds, interleaved (each round starts one method later than the last, so no method
always follows the same one), and the table reports the median per method. The top-1 agreement lines
compare the classes the first timed round produced.

This machine may be shared (builds, test runs): before each round the script waits, within --max-wait
seconds in all, until other processes use less than --idle-threshold cores; it reports the CPU other
processes used during each round (from /proc/stat), and a round during which they used more than
--idle-threshold cores is left out of the medians and run again (at most --repeats extra rounds;
--no-retry keeps every round). The "CPU cores" column is this process's CPU time over wall time.

    python3 benchmarks/end_to_end.py                    # full run, ~1.5 min on 2 cores (plus waits)
    python3 benchmarks/end_to_end.py --quick            # ~30 s smoke run
    python3 benchmarks/end_to_end.py --write-results    # also record the run in benchmarks/RESULTS.md
    python3 benchmarks/end_to_end.py --json out.json    # also dump the raw numbers
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the shared harness lives next to this script
from _harness import ForeignLoad, add_output_arguments, add_wait_arguments, finish, fmt  # noqa: E402
from _harness import import_speciesclf, loadavg, loadavg_line, log, machine_info, retrying, run_info  # noqa: E402
from _harness import median_and_spread, shared_dir  # noqa: E402

THREADS = 2  # "both cores"
BATCH = 64
TOP_K = 5
SIZE, RESIZE = 224, 256
MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
STD = np.asarray((0.229, 0.224, 0.225), np.float32)
INPUT, OUTPUT = "input", "output"

PREDICT_BATCH = "speciesclf predict_batch"
PER_IMAGE = "per-image loop"
BATCHED_SEQ = "batched Pillow + ORT (sequential)"
BATCHED_POOL = "batched Pillow + ORT (2-thread pool)"
ORT_READY = "ORT on ready tensors"
ORT_READY_SLICED = "ORT on ready tensors, 8 per run"
ORT_READY_PARALLEL = "ORT on ready tensors, 2 single-thread runs at once"
PREPROCESS_ONLY = "(diagnostic) speciesclf preprocess only"
DECODE_ONLY = "(diagnostic) decode only"

# -------------------------------------------------------------------------------------- the recipe


def pillow_preprocess(data: bytes) -> np.ndarray:
    """Encoded bytes -> (3, 224, 224) float32 (a CHW view of an HWC array)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = RESIZE, int(RESIZE * h / w)
    else:
        nw, nh = int(RESIZE * w / h), RESIZE
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - SIZE) / 2.0)), int(round((nh - SIZE) / 2.0))
    img = img.crop((left, top, left + SIZE, top + SIZE))
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x -= MEAN
    x /= STD
    return x.transpose(2, 0, 1)


def softmax_top_k(logits: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) logits -> ((N, k) class indices, (N, k) probabilities), best first.

    The int8 model's logits are quantized, so ties happen (at the top for ~1% of the photos): equal scores
    are ordered by class index, as argmax and the library's stable argsort order them.
    """
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    part = np.sort(np.argpartition(-p, k, axis=1)[:, :k], axis=1)
    order = np.argsort(-np.take_along_axis(p, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    return top, np.take_along_axis(p, top, axis=1)


# ---------------------------------------------------------------------------------------------- methods


@dataclasses.dataclass
class Method:
    name: str
    run: Callable[[list[bytes]], Any]  # classifies the whole list once
    top1: Callable[[Any], np.ndarray] | None  # run's result -> top-1 class per image (None: no predictions)


def make_session(ort, model: Path, threads: int = THREADS):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def build_methods(speciesclf, clf, ort, model: Path, datas: list[bytes]) -> list[Method]:
    session_1 = make_session(ort, model)  # the per-image loop's (batch 1)
    session_64 = make_session(ort, model)  # the batched methods'
    session_single = make_session(ort, model, threads=1)  # run by THREADS threads at once
    buffer = np.zeros((BATCH, 3, SIZE, SIZE), np.float32)
    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="bench-pillow")
    ready = [
        np.ascontiguousarray(np.stack([pillow_preprocess(b) for b in datas[i : i + BATCH]]))
        for i in range(0, len(datas), BATCH)
    ]

    def predict_batch(xs):
        return clf.predict_batch(xs, top_k=TOP_K)

    def predict_batch_top1(predictions):
        return np.array([-1 if p.index is None else p.index for p in predictions])

    def per_image(xs):
        top1 = np.empty(len(xs), np.int64)
        for i, b in enumerate(xs):
            x = np.ascontiguousarray(pillow_preprocess(b)[None])
            logits = session_1.run([OUTPUT], {INPUT: x})[0]
            classes, _ = softmax_top_k(logits)
            top1[i] = classes[0, 0]
        return top1

    def batched(threaded: bool):
        def fill(item):
            i, b = item
            buffer[i] = pillow_preprocess(b)

        def run(xs):
            tops = []
            for start in range(0, len(xs), BATCH):
                chunk = list(enumerate(xs[start : start + BATCH]))
                if threaded:
                    list(pool.map(fill, chunk))
                else:
                    for item in chunk:
                        fill(item)
                logits = session_64.run([OUTPUT], {INPUT: buffer[: len(chunk)]})[0]
                classes, _ = softmax_top_k(logits)
                tops.append(classes[:, 0])
            return np.concatenate(tops)

        return run

    def ort_ready(xs):  # xs unused: the tensors were made from the same images beforehand
        return [session_64.run([OUTPUT], {INPUT: x})[0] for x in ready]

    def ort_ready_sliced(xs):
        return [session_64.run([OUTPUT], {INPUT: x[i : i + 8]})[0] for x in ready for i in range(0, len(x), 8)]

    def ort_ready_parallel(xs):
        slices = [x[i : i + 4] for x in ready for i in range(0, len(x), 4)]
        return list(pool.map(lambda x: session_single.run([OUTPUT], {INPUT: x})[0], slices))

    def decode_only(xs):
        list(pool.map(speciesclf.decode, xs))

    def preprocess_only(xs):
        for start in range(0, len(xs), BATCH):
            speciesclf.preprocess_batch(xs[start : start + BATCH], clf.spec, threads=THREADS, on_error="skip")

    return [
        Method(PREDICT_BATCH, predict_batch, predict_batch_top1),
        Method(PER_IMAGE, per_image, lambda r: r),
        Method(BATCHED_SEQ, batched(False), lambda r: r),
        Method(BATCHED_POOL, batched(True), lambda r: r),
        Method(ORT_READY, ort_ready, lambda outs: np.concatenate([o.argmax(axis=1) for o in outs])),
        Method(ORT_READY_SLICED, ort_ready_sliced, lambda outs: np.concatenate([o.argmax(axis=1) for o in outs])),
        Method(ORT_READY_PARALLEL, ort_ready_parallel,
               lambda outs: np.concatenate([o.argmax(axis=1) for o in outs])),
        Method(PREPROCESS_ONLY, preprocess_only, None),
        Method(DECODE_ONLY, decode_only, None),
    ]


# ---------------------------------------------------------------------------------------------- timing


def measure(methods: list[Method], datas: list[bytes], warm: list[bytes], repeats: int, extra_rounds: int,
            threshold: float, wait: Callable[[], None], log: Callable[[str], None]):
    """Warms every method up on ``warm``, then times them on ``datas`` in interleaved rounds until ``repeats``
    rounds ran while other processes used less than ``threshold`` cores (or ``extra_rounds`` more rounds were
    spent trying).

    Returns ({name: [s per round]}, {name: [own CPU cores per round]}, [other processes' cores per round],
    {name: the first timed round's result}).
    """
    for m in methods:
        t0 = time.perf_counter()
        m.run(warm)
        log(f"[bench] warm-up {m.name}: {time.perf_counter() - t0:.2f} s")
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu: dict[str, list[float]] = {m.name: [] for m in methods}
    first: dict[str, Any] = {}
    foreign: list[float] = []
    load = ForeignLoad()
    while sum(x < threshold for x in foreign) < repeats and len(foreign) < repeats + extra_rounds:
        wait()
        shift = len(foreign) % len(methods)
        a = load.sample()
        for m in methods[shift:] + methods[:shift]:
            c0, t0 = os.times(), time.perf_counter()
            result = m.run(datas)
            t1, c1 = time.perf_counter(), os.times()
            times[m.name].append(t1 - t0)
            cpu[m.name].append(((c1.user + c1.system) - (c0.user + c0.system)) / (t1 - t0))
            first.setdefault(m.name, result)
        foreign.append(load.cores(a, load.sample()))
        log(f"[bench] round {len(foreign)}: " + ", ".join(f"{m.name} {times[m.name][-1]:.3f} s" for m in methods)
            + f"; other processes {foreign[-1]:.2f} cores")
    return times, cpu, foreign, first


# --------------------------------------------------------------------------------------------- reporting


def summarize(times: list[float], cpu: list[float], quiet: list[int], n: int) -> dict:
    med, spread = median_and_spread(times, quiet)
    return {
        "times_s": times,
        "cpu_cores": cpu,
        "median_s": med,
        "img_per_s": n / med,
        "spread_pct": spread,
        "median_cpu_cores": statistics.median(cpu[i] for i in quiet),
    }


def analyse(results: dict) -> tuple[list[str], list[str], list[str], dict]:
    """(ratio lines, target check lines, sanity lines, raw numbers)."""
    r = results["results"]
    peer_name = max((BATCHED_SEQ, BATCHED_POOL), key=lambda k: r[k]["img_per_s"])
    variant = peer_name.split("(")[1].rstrip(")")
    ceiling_name = best_ort(r)
    pb, loop, peer, ceiling = r[PREDICT_BATCH], r[PER_IMAGE], r[peer_name], r[ceiling_name]
    vs_loop = pb["img_per_s"] / loop["img_per_s"]
    vs_peer = pb["img_per_s"] / peer["img_per_s"]
    of_ceiling = pb["img_per_s"] / ceiling["img_per_s"]
    pool_vs_seq = r[BATCHED_POOL]["img_per_s"] / r[BATCHED_SEQ]["img_per_s"]
    raw = {
        "peer": peer_name,
        "ceiling": ceiling_name,
        "predict_batch_vs_per_image": vs_loop,
        "predict_batch_vs_batched_peer": vs_peer,
        "predict_batch_fraction_of_ort_ready": of_ceiling,
        "batched_pool_vs_sequential": pool_vs_seq,
    }
    ratios = [
        f"- predict_batch = {vs_loop:.2f}× per-image loop, {vs_peer:.2f}× batched Pillow + ORT (peer: the faster "
        f"variant, {variant}), {100 * of_ceiling:.0f}% of ORT on ready tensors (the faster way: {ceiling_name})",
        f"- batched Pillow + ORT: 2-thread pool = {pool_vs_seq:.2f}× sequential preprocessing",
        f"- per-image loop = {100 * loop['img_per_s'] / ceiling['img_per_s']:.0f}% of ORT on ready tensors; "
        f"batched peer = {100 * peer['img_per_s'] / ceiling['img_per_s']:.0f}%",
    ]
    pre = r.get(PREPROCESS_ONLY)
    if pre is not None:
        back_to_back = pre["median_s"] + ceiling["median_s"]
        cpu_s = pre["median_s"] * pre["median_cpu_cores"] + ceiling["median_s"] * ceiling["median_cpu_cores"]
        floor = cpu_s / THREADS
        best = results["n"] / floor
        raw.update(stages_back_to_back_s=back_to_back, cpu_bound_floor_s=floor, cpu_bound_best_img_per_s=best,
                   predict_batch_over_back_to_back=pb["median_s"] / back_to_back)
        ratios += [
            f"- predict_batch's stages: speciesclf preprocessing alone {pre['median_s']:.3f} s + ORT on ready "
            f"tensors {ceiling['median_s']:.3f} s = {back_to_back:.3f} s back to back; predict_batch takes "
            f"{pb['median_s']:.3f} s = {pb['median_s'] / back_to_back:.2f}× that (1.00 = no gain from overlapping "
            f"the stages); the two stages' CPU time over {THREADS} cores = {floor:.3f} s (a floor for any overlap, "
            "counting ORT's spin-waiting as work)",
            f"- at that floor predict_batch would do {best:,.0f} img/s = {best / loop['img_per_s']:.2f}× per-image "
            f"loop, {best / peer['img_per_s']:.2f}× the batched peer, {100 * best / ceiling['img_per_s']:.0f}% of ORT "
            f"on ready tensors: the most {THREADS} cores allow with this preprocessing cost",
        ]
    dec = r.get(DECODE_ONLY)
    if dec is not None:
        cpu_s = dec["median_s"] * dec["median_cpu_cores"] + ceiling["median_s"] * ceiling["median_cpu_cores"]
        bound = results["n"] * THREADS / cpu_s
        raw.update(decode_floor_best_img_per_s=bound)
        ratios.append(
            f"- with preprocessing as cheap as decoding alone ({dec['median_s']:.3f} s on {THREADS} threads; no resize, "
            f"no normalisation, no Python) and perfect overlap, the two stages' CPU time allows at most {bound:,.0f} "
            f"img/s = {bound / loop['img_per_s']:.2f}× per-image loop, {100 * bound / ceiling['img_per_s']:.0f}% of ORT "
            "on ready tensors: a bound for any pipeline that decodes these JPEGs on this CPU"
        )

    def check(text: str, value: float, target: float, percent: bool = False) -> str:
        shown = f"{100 * value:.0f}%" if percent else f"{value:.2f}×"
        return f"- {text}: measured {shown} — {'PASS' if value >= target else 'MISS'}"

    checks = [
        check("predict_batch >= 2.5x per-image loop", vs_loop, 2.5),
        check(f"predict_batch >= 1.6x batched Pillow + ORT (peer: {variant})", vs_peer, 1.6),
        check("predict_batch >= 65% of ORT on ready tensors", of_ceiling, 0.65, percent=True),
    ]
    if results["busy"]:
        checks.append("- WARNING: no round was quiet (other processes kept the machine busy); not a clean measurement")

    top1 = results["top1"]
    n = len(top1[PER_IMAGE])
    agree = float(np.mean(top1[PREDICT_BATCH] == top1[PER_IMAGE]))
    raw["top1_agreement_predict_batch_vs_per_image"] = agree
    sanity = [
        f"- top-1 agreement, predict_batch vs per-image loop: {agree:.4f} ({int(round(agree * n))} of {n} images "
        f"have the same argmax; ties go to the lower class index, and {results['tied_top1']} photos have tied "
        "best logits with the Pillow recipe's input)"
    ]
    for name in (BATCHED_SEQ, ORT_READY):
        same = float(np.mean(top1[name] == top1[PER_IMAGE]))
        sanity.append(f"- top-1 agreement, {name} vs per-image loop: {same:.4f} (same Pillow recipe; batching only)")
    truth = results.get("labels")
    if truth is not None:
        truth = np.asarray(truth)
        known = truth >= 0
        accuracy = {name: float(np.mean(top1[name][known] == truth[known])) for name in (PREDICT_BATCH, PER_IMAGE)}
        raw["top1_accuracy"] = accuracy
        sanity.append(
            f"- top-1 accuracy against labels.csv ({int(known.sum())} images): predict_batch "
            f"{accuracy[PREDICT_BATCH]:.3f}, per-image loop (Pillow) {accuracy[PER_IMAGE]:.3f}"
        )
    return ratios, checks, sanity, raw


def best_ort(r: dict) -> str:
    """The ceiling: ORT's faster way through the ready tensors (older result files have one way only)."""
    return max((name for name in (ORT_READY, ORT_READY_SLICED, ORT_READY_PARALLEL) if name in r),
               key=lambda name: r[name]["img_per_s"])


def render(results: dict, ratios: list[str], checks: list[str], sanity: list[str]) -> str:
    r = results["results"]
    loop, ceiling = r[PER_IMAGE], r[best_ort(r)]
    peer = results["raw"]["peer"]
    lines = [
        f"- {results['n']} images, {results['mean_kb']:.0f} KiB per file on average, {results['images']}; "
        f"{results['repeats']} repeats",
        "",
        "| Method | Median s | img/s | × per-image loop | % of ORT on ready tensors | CPU cores | spread |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["methods"]:
        x = r[name]
        label = name + (" — peer" if name == peer else "")
        lines.append(
            f"| {label} | {x['median_s']:.3f} | {fmt(x['img_per_s'], 1)} | {fmt(x['img_per_s'] / loop['img_per_s'])} | "
            f"{100 * x['img_per_s'] / ceiling['img_per_s']:.0f}% | {x['median_cpu_cores']:.2f} | "
            f"{x['spread_pct']:.0f}% |"
        )
    lines += ["", "Ratios (same run):", *ratios, "", "Target checks:", *checks, "", "Sanity:", *sanity, ""]
    foreign = results["foreign_cores"]
    used = results["rounds_used"]
    dropped = len(foreign) - len(used) if not results["busy"] else 0
    lines += [
        f"CPU used by other processes during the rounds behind the medians (cores, worst round): "
        f"{max(foreign[i] for i in used):.2f}" + (f" ({dropped} busy round(s) left out and rerun)" if dropped else "")
        + (" — WARNING: no quiet round, treat these rows with caution" if results["busy"] else "") + ".",
        "Spread = (max - min) / median over those rounds; CPU cores = this process's user + system CPU time over "
        "wall time (median), so 2.00 means both cores busy (ORT's spin-waiting counts as busy).",
        loadavg_line(results),
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def read_labels(folder: Path, paths: list[Path]) -> list[int] | None:
    """labels.csv's class index for each photo (-1 where it has none), or None without the file."""
    path = folder / "labels.csv"
    if not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        by_file = {row["file"]: int(row["class_index"]) for row in csv.DictReader(f)}
    return [by_file.get(p.name, -1) for p in paths]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 11; --quick 3)")
    add_wait_arguments(p)
    p.add_argument(
        "--warmup-items", type=int, default=None,
        help="images in each method's untimed warm-up pass (default 0: all of them; --quick 128)",
    )
    p.add_argument("--no-retry", action="store_true", help="keep every round, quiet or not, and run no extra rounds")
    p.add_argument("--no-diagnostic", action="store_true", help="skip the speciesclf preprocess-only row")
    add_output_arguments(p, "a ~30 s smoke run with fewer rounds")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 11)
    if args.max_wait is None:
        args.max_wait = 10.0 if args.quick else 60.0
    if args.warmup_items is None:
        args.warmup_items = 2 * BATCH if args.quick else 0
    if repeats < 1:
        p.error("--repeats must be >= 1")

    t_start = time.perf_counter()
    load_before = loadavg()
    speciesclf = import_speciesclf()
    import onnxruntime as ort

    folder = shared_dir() / "images" / "imagenet-samples"
    paths = sorted(Path(x) for x in glob.glob(str(folder / "*.JPEG")))
    model = shared_dir() / "models" / "mobilenetv2-12-int8.onnx"
    if not paths or not model.exists():
        raise SystemExit(f"need {folder}/*.JPEG and {model}; set SPECIESCLF_SHARED")
    datas = [x.read_bytes() for x in paths]

    clf = retrying(
        "Classifier.load",
        lambda: import_speciesclf().Classifier.load(model, labels="imagenet1k", batch_size=BATCH, threads=THREADS),
    )
    speciesclf = sys.modules["speciesclf"]  # the module the classifier came from, after any retry
    methods = build_methods(speciesclf, clf, ort, model, datas)
    if args.no_diagnostic:
        methods = [m for m in methods if m.name not in (PREPROCESS_ONLY, DECODE_ONLY)]

    budget = [float(args.max_wait)]
    load = ForeignLoad()
    warm = datas[: args.warmup_items] if args.warmup_items else datas
    times, cpu, foreign, first = measure(
        methods, datas, warm, repeats, 0 if args.no_retry else repeats, args.idle_threshold,
        lambda: load.wait_idle(budget, args.idle_threshold, log), log,
    )
    failed = [(i, p.error) for i, p in enumerate(first[PREDICT_BATCH]) if p.error is not None]
    if failed:
        log(f"[bench] warning: predict_batch failed on {len(failed)} photos: {failed[:3]}")
    top1 = {m.name: m.top1(first[m.name]) for m in methods if m.top1 is not None}
    best_two = np.sort(np.concatenate(first[ORT_READY]), axis=1)[:, -2:]
    tied = int(np.sum(best_two[:, 0] == best_two[:, 1]))  # photos whose two best logits are equal
    quiet = [i for i, x in enumerate(foreign) if x < args.idle_threshold]
    busy = not quiet
    used = quiet or list(range(len(foreign)))

    results: dict[str, Any] = {
        **run_info(argv),
        "machine": machine_info(speciesclf, {"onnxruntime": ort}),
        "model": str(model),
        "images": f"{folder}/*.JPEG",
        "spec": {k: v for k, v in clf.spec.to_dict().items() if k not in ("max_pixels", "max_bytes")},
        "n": len(datas),
        "mean_kb": sum(map(len, datas)) / len(datas) / 1024,
        "repeats": repeats,
        "warmup": f"first {len(warm)} images" if len(warm) < len(datas) else "all images",
        "methods": [m.name for m in methods],
        "idle_threshold": args.idle_threshold,
        "foreign_cores": foreign,
        "rounds_used": used,
        "busy": busy,
        "loadavg_before": load_before,
        "results": {m.name: summarize(times[m.name], cpu[m.name], used, len(datas)) for m in methods},
        "top1": top1,
        "tied_top1": tied,
        "labels": read_labels(folder, paths),
    }
    results["loadavg_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - t_start
    ratios, checks, sanity, raw = analyse(results)
    results["raw"] = raw
    results["checks"] = checks
    body = render(results, ratios, checks, sanity)
    dump = {**results, "top1": {k: v.tolist() for k, v in top1.items()}}
    details = [
        f"- Model: {results['model']} (input `{INPUT}`, output `{OUTPUT}`), ONNX Runtime CPU provider, "
        f"intra_op_num_threads={THREADS} in every session but the one named; predict_batch via `Classifier.load(model, "
        f"labels=\"imagenet1k\", batch_size={BATCH}, threads={THREADS})` with its default spec ({results['spec']}; "
        "its runtime runs each batch in parts of 8 images, two side by side on a second, single-threaded session)",
        "- Medians over the repeats, methods interleaved round-robin (each round starting one method later), one "
        f"untimed warm-up pass each ({results['warmup']}); encoded bytes in memory; top-5 with softmax in every "
        "method but ORT on ready tensors. The Pillow methods use torchvision's recipe written out (bilinear resize "
        "of the shorter side to 256, center crop 224, float32 normalisation, CHW); batched Pillow + ORT "
        "preprocesses 64 images into a preallocated buffer, sequentially or on a ThreadPoolExecutor(2), then runs "
        "ORT on them; the faster variant is the peer. The diagnostic row is speciesclf.preprocess_batch alone over "
        f"the same chunks of 64, no inference. The run took {results['wall_s']:.0f} s.",
    ]
    finish(results, body, args, "end_to_end.py — files in memory to predictions", details, dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
