#!/usr/bin/env python3
"""CPU against GPU: encoded JPEG files held in memory -> softmax top-1 on the CPU, images per second.

Paths (each a loop written here, so that every row runs the same torch model at the same precision):
  python   speciesclf.preprocess_batch(batch, spec, backend="python", threads=T, out=preallocated) on the
           CPU, then the model on the CPU (fp32, torch.set_num_threads(T))
  native   the same with backend="native"
  gpu      speciesclf.preprocessing.gpu.GpuPreprocessor(spec, device, max_batch)(batch).array: nvJPEG decode and the
           fused resize/crop/normalise kernel, output in the model's dtype; then the model on the GPU.
           End to end it is pipelined as speciesclf's Classifier runs it: batch k+1 is preprocessed on a
           worker thread (the preprocessor's own stream, the other of two buffers) while batch k runs
  peer     torchvision.io.decode_jpeg(list of uint8 tensors, mode=RGB, device="cuda"), then per image
           torch.nn.functional.interpolate(bilinear, antialias=True) of the float32 image to shorter side 256,
           center crop 224, batched /255 and ImageNet normalisation, cast to the model's dtype; the photos
           the GPU decoder rejects (found once, untimed) are decoded by torchvision on the CPU and copied over
  dali     NVIDIA DALI: fn.decoders.image(device="mixed") + fn.resize(resize_shorter=256, antialias) +
           fn.crop_mirror_normalize(crop 224, CHW, the model's dtype), run synchronously one batch at a time
           (feed_input + run), copied into a torch tensor; only where nvidia.dali imports
T is os.cpu_count() (--threads). GPU rows run the model at --precision (fp16 by default) in channels_last
memory format with cudnn.benchmark on; CPU rows run it in fp32. Every end-to-end row ends with softmax,
top-1 class and probability copied to the CPU, so its time covers all the work. The models are MobileNetV2
and ResNet-50 with random weights: torchvision.models' when importable, else benchmarks/_models.py's (the
same architectures); one instance each, copied to every path, so all rows of a run share the weights.

"Preprocessing only" rows time each path's preprocessing alone (GPU rows synchronise before the clock
stops), in the model dtype on the GPU and float32 on the CPU.

Data sets, all in memory before timing:
  shared   the shared photos ($SPECIESCLF_SHARED/images/imagenet-samples/*.JPEG, default ../shared)
           repeated in order to --images items (the same bytes objects; 10,000 by default)
  12 MP    --n12mp photos upscaled to 4032x3024 and saved as JPEG quality 90 (benchmarks/preprocess.py's
           helper, cached in benchmarks/_data/), repeated to --images-12mp items

Measurement: each row processes consecutive fixed-size batches from its data set (continuing where its last
measurement stopped) until it has done one pass over the set or --seconds have passed, whichever comes
first, at least one batch; img/s = images / wall seconds. --repeats rounds with the rows interleaved (each
round starting one row later; the first round in priority order, the rows behind the targets first), medians
reported; right before its first measurement each row runs an untimed warm-up (1 batch on the CPU,
--warmup-batches on the GPU: cuDNN's autotuning, nvJPEG's and the caching allocator's first allocations).
As in the other benchmarks, before each round the script waits (within --max-wait s) for other processes to
use less than --idle-threshold cores, and a round during which they used more is left out of the medians
and rerun (up to --repeats extra rounds). --budget stops starting new measurements after that many seconds
of measuring, so the script ends in bounded time (rows cut by it say so).

Rows that cannot run here print "not measured: <reason>" (no CUDA, no torchvision, no DALI...), and the
script still exits 0.

    python3 benchmarks/cpu_vs_gpu.py --quick                       # smoke run
    python3 benchmarks/cpu_vs_gpu.py --images 2000 --repeats 3     # a modest CPU-only run
    python3 benchmarks/cpu_vs_gpu.py --write-results --json out.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# the shared harness and the 12 MP helper live next to this script
from _harness import ForeignLoad, add_output_arguments, add_wait_arguments, finish, fmt  # noqa: E402
from _harness import import_speciesclf, loadavg, loadavg_line, log, machine_info, run_info, shared_dir  # noqa: E402
from preprocess import MEAN, RESIZE, SIZE, STD, W12, H12, Q12, make_12mp, shared_photo_paths  # noqa: E402
from preprocess import torchvision_geometry  # noqa: E402
import _models  # noqa: E402

PATHS = ("gpu", "peer", "dali", "native", "python")
LABELS = {
    "python": "CPU python (Pillow)",
    "native": "CPU native",
    "gpu": "GPU speciesclf",
    "peer": "GPU torchvision peer",
    "dali": "GPU DALI",
}
GPU_PATHS = ("gpu", "peer", "dali")
PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # --precision -> spec and torch dtype name

TARGET_PRE = 10_000.0
TARGET_VS_PEER = 1.5
TARGET_VS_CPU = 5.0

# torch.frombuffer over immutable bytes warns once; the peer only reads the buffer
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def optional_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def parse_ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def parse_names(allowed) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return names

    return parse


# --------------------------------------------------------------------------------------- availability


def gpu_state(torch, scl, device: str) -> tuple[bool, str]:
    """(usable, reason) for speciesclf's GPU path; the reason is what a row that cannot run says."""
    if torch is None:
        return False, "torch not importable"
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (" (CPU-only build)" if torch.version.cuda is None else "")
        return False, f"no CUDA device visible to {build}"
    try:
        gpu = importlib.import_module("speciesclf.preprocessing.gpu")
    except Exception as e:
        return False, f"speciesclf.preprocessing.gpu not importable ({type(e).__name__}: {e})"
    status = getattr(gpu, "cuda_status", None)
    if status is None:
        return False, "speciesclf.preprocessing.gpu has no cuda_status()"
    ok, why = status()
    return (True, "") if ok else (False, f"speciesclf.preprocessing.gpu.cuda_status(): {why}")


def peer_state(torch, tv_io, device: str, sample: bytes) -> tuple[bool, str]:
    if torch is None or not torch.cuda.is_available():
        return False, "no CUDA device"
    if tv_io is None:
        return False, "torchvision not importable"
    try:
        tv_io.decode_jpeg([torch.frombuffer(sample, dtype=torch.uint8)], mode=tv_io.ImageReadMode.RGB, device=device)
    except Exception as e:
        return False, f"torchvision.io.decode_jpeg(device={device!r}) failed: {type(e).__name__}: {e}"
    return True, ""


def dali_state(torch, dali) -> tuple[bool, str]:
    if torch is None or not torch.cuda.is_available():
        return False, "no CUDA device"
    if dali is None:
        return False, "nvidia.dali not importable (not installed here)"
    return True, ""


# ------------------------------------------------------------------------------------------ pipelines


class CpuPreprocess:
    """speciesclf on the CPU into one preallocated float32 buffer; returns a torch view of it."""

    def __init__(self, scl, torch, spec, backend: str, threads: int, buffer: np.ndarray):
        self.scl, self.torch, self.spec, self.backend, self.threads, self.buffer = scl, torch, spec, backend, threads, buffer

    def __call__(self, items: list[bytes]):
        out = self.buffer[: len(items)]
        self.scl.preprocess_batch(items, self.spec, threads=self.threads, backend=self.backend, out=out)
        return self.torch.from_numpy(out)


class GpuPreprocess:
    """speciesclf's owned GPU preprocessor, reused across batches as its docs recommend for loops."""

    def __init__(self, scl_gpu, spec, device: str, max_batch: int):
        self.pre = scl_gpu.GpuPreprocessor(spec, device=device, max_batch=max_batch)

    def __call__(self, items: list[bytes]):
        return self.pre(items).array


class PipelinedGpuEndToEnd:
    """speciesclf's GPU path end to end as its Classifier runs it: batch k+1 is preprocessed on a worker
    thread (its own CUDA stream, into the other of two buffers) while the model runs batch k. Results come
    one call late; sync() drains the last batch."""

    def __init__(self, torch, gpu: GpuPreprocess, model, device, dtype, max_batch: int):
        from concurrent.futures import ThreadPoolExecutor

        self.torch, self.pre, self.model = torch, gpu.pre, model
        shape = (max_batch, 3, SIZE, SIZE)
        self.buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        torch.cuda.synchronize(device)  # the buffers are idle from here on: no need to wait for torch's stream
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="bench-gpu-pre")
        self.pending = None
        self.calls = 0

    def infer(self, x):
        with self.torch.inference_mode():
            p = self.model(x).float().softmax(dim=1)
            conf, top = p.max(dim=1)
        return top.cpu(), conf.cpu()  # reading back makes the buffer idle again before it is reused

    def __call__(self, items: list[bytes]):
        out = self.buffers[self.calls % 2][: len(items)]
        self.calls += 1
        submitted = self.worker.submit(self.pre, items, out=out, wait_for_torch=False)
        result = self.infer(self.pending.result().array) if self.pending is not None else None
        self.pending = submitted
        return result

    def sync(self) -> None:
        if self.pending is not None:
            self.infer(self.pending.result().array)
            self.pending = None


class PeerPreprocess:
    """The torchvision recipe on the GPU, the way a user without speciesclf would write it."""

    def __init__(self, torch, tv_io, device: str, dtype, cpu_decode: set[int]):
        self.torch, self.io, self.device, self.dtype = torch, tv_io, device, dtype
        self.cpu_decode = cpu_decode  # id() of the bytes objects nvJPEG rejected (CMYK...)
        self.mean = torch.tensor(MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(STD, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.F = torch.nn.functional

    def decode(self, items: list[bytes]) -> list:
        torch, tv = self.torch, self.io
        tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in items]
        on_gpu = [i for i, b in enumerate(items) if id(b) not in self.cpu_decode]
        images: list = [None] * len(items)
        if on_gpu:
            decoded = tv.decode_jpeg([tensors[i] for i in on_gpu], mode=tv.ImageReadMode.RGB, device=self.device)
            for i, img in zip(on_gpu, decoded):
                images[i] = img
        for i in range(len(items)):
            if images[i] is None:
                images[i] = tv.decode_jpeg(tensors[i], mode=tv.ImageReadMode.RGB).to(self.device, non_blocking=True)
        return images

    def __call__(self, items: list[bytes]):
        torch = self.torch
        out = torch.empty((len(items), 3, SIZE, SIZE), dtype=torch.float32, device=self.device)
        for i, img in enumerate(self.decode(items)):
            h, w = img.shape[-2:]
            nw, nh, left, top = torchvision_geometry(w, h)
            x = self.F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            out[i] = x[0, :, top : top + SIZE, left : left + SIZE]
        out.sub_(self.mean).div_(self.std)
        return out if self.dtype == torch.float32 else out.to(self.dtype)


class DaliPreprocess:
    """A DALI pipeline for one batch size, fed and run synchronously per batch.

    Written against DALI's documented Python API but not yet run on any machine (DALI is not installed
    where this benchmark has run so far); a failure makes the row say "failed: ..." instead of aborting.
    """

    def __init__(self, torch, dali, batch: int, threads: int, device: str, dtype):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import feed_ndarray

        self.torch, self.batch, self.dtype, self.feed_ndarray = torch, batch, dtype, feed_ndarray
        self.device = torch.device(device)
        out_type = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
        self.out_dtype = torch.float16 if dtype == torch.float16 else torch.float32

        @pipeline_def(batch_size=batch, num_threads=threads, device_id=self.device.index or 0,
                      exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=RESIZE, antialias=True, interp_type=types.INTERP_LINEAR)
            return fn.crop_mirror_normalize(
                images, crop=(SIZE, SIZE), crop_pos_x=0.5, crop_pos_y=0.5, dtype=out_type, output_layout="CHW",
                mean=[m * 255.0 for m in MEAN], std=[s * 255.0 for s in STD],
            )

        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, items: list[bytes]):
        torch = self.torch
        self.pipe.feed_input("jpegs", [np.frombuffer(b, dtype=np.uint8) for b in items])
        (out,) = self.pipe.run()
        tensor = out.as_tensor()
        x = torch.empty(tuple(tensor.shape()), dtype=self.out_dtype, device=self.device)
        self.feed_ndarray(tensor, x, cuda_stream=torch.cuda.current_stream(self.device))
        return x if x.dtype == self.dtype else x.to(self.dtype)


def end_to_end(torch, preprocess, model, device, dtype) -> Callable[[list[bytes]], Any]:
    """preprocess -> model -> softmax -> (top-1 class, probability) on the CPU."""

    def run(items: list[bytes]):
        x = preprocess(items)
        if x.device != device or x.dtype != dtype:
            x = x.to(device=device, dtype=dtype, non_blocking=True)
        with torch.inference_mode():
            p = model(x).float().softmax(dim=1)
            conf, top = p.max(dim=1)
        return top.cpu(), conf.cpu()

    return run


# --------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Row:
    kind: str  # "e2e" or "pre"
    data: str  # data set key
    path: str
    model: str | None
    batch: int
    dtype: str
    run: Callable[[list[bytes]], Any] | None = None
    sync: Callable[[], None] = lambda: None
    reason: str | None = None  # why it has no figure
    cursor: int = 0
    rates: list[float] = dataclasses.field(default_factory=list)
    images: list[int] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    rounds: list[int] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        return "/".join([self.kind, self.data, self.model or "-", self.path, f"b{self.batch}"])

    def priority(self) -> tuple:
        # the rows behind the three targets first, so that a --budget cut leaves the other rows out
        target = self.data == "shared" and self.batch == 256 and self.path in ("gpu", "peer", "native")
        return (not target, self.data != "shared", -self.batch, PATHS.index(self.path), self.kind != "pre")


def next_batch(row: Row, items: list[bytes]) -> list[bytes]:
    n = len(items)
    start = row.cursor
    row.cursor = (start + row.batch) % n
    if start + row.batch <= n:
        return items[start : start + row.batch]
    return [items[(start + k) % n] for k in range(row.batch)]


def timed(row: Row, items: list[bytes], seconds: float) -> tuple[int, float]:
    """Consecutive batches until one pass over ``items`` or ``seconds``; (images, wall seconds)."""
    limit = max(len(items), row.batch)
    done = 0
    t0 = time.perf_counter()
    while True:
        row.run(next_batch(row, items))
        done += row.batch
        if done >= limit or time.perf_counter() - t0 >= seconds:
            break
    row.sync()
    return done, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- machine


def gpu_info(torch, device: str) -> dict:
    info: dict[str, Any] = {}
    if torch is None or not torch.cuda.is_available():
        return info
    dev = torch.device(device)
    info["name"] = torch.cuda.get_device_name(dev)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    info["memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    info["torch_cuda"] = torch.version.cuda
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.split()
            info["driver"] = out[0] if out else None
        except Exception:
            pass
    return info


# --------------------------------------------------------------------------------------------- sanity


def parity(scl, pres: dict[str, Any], datas: list[bytes], chunk: int) -> dict:
    """Mean / max |path - native float32| in 1/255 pixel units over ``datas`` (distinct photos), each path
    fed ``chunk`` images at a time (its preallocated buffers are only that large)."""
    ref = scl.preprocess_batch(datas, scl.PreprocessSpec(), backend="native").array
    scale = np.asarray(STD, np.float32).reshape(1, 3, 1, 1) * 255.0
    result = {}
    for name, pre in pres.items():
        try:
            parts = []
            for start in range(0, len(datas), chunk):
                out = pre(datas[start : start + chunk])
                # a copy: the CPU paths hand back views of one buffer that the next chunk overwrites
                parts.append(np.array(out.float().cpu().numpy() if hasattr(out, "cpu") else out, np.float32, copy=True))
            diff = np.abs(np.concatenate(parts) - ref) * scale
            result[name] = {"mean": float(diff.mean()), "max": float(diff.max())}
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"}
    return result


# ------------------------------------------------------------------------------------------- reporting


def summarize(row: Row, foreign: list[float], threshold: float) -> dict:
    d: dict[str, Any] = {
        "kind": row.kind, "data": row.data, "path": row.path, "model": row.model, "batch": row.batch,
        "dtype": row.dtype, "reason": row.reason, "rates": row.rates, "images": row.images,
        "seconds": row.seconds, "rounds": row.rounds,
    }
    if row.rates:
        quiet = [i for i, r in enumerate(row.rounds) if foreign[r] < threshold] or list(range(len(row.rates)))
        used = [row.rates[i] for i in quiet]
        med = statistics.median(used)
        d.update(img_per_s=med, spread_pct=100.0 * (max(used) - min(used)) / med, rounds_used=len(used),
                 busy=not any(foreign[r] < threshold for r in row.rounds))
    return d


def lookup(rows: list[dict], kind: str, data: str, path: str, model: str | None, batch: int) -> dict | None:
    for r in rows:
        if (r["kind"], r["data"], r["path"], r["model"], r["batch"]) == (kind, data, path, model, batch):
            return r
    return None


def rate(r: dict | None) -> float | None:
    return None if r is None else r.get("img_per_s")


def table(results: dict, kind: str) -> list[str]:
    rows = [r for r in results["rows"] if r["kind"] == kind]
    batches = sorted({r["batch"] for r in rows})
    head = ["Data", *(["Model"] if kind == "e2e" else []), "Path", "dtype", *(f"b={b} img/s" for b in batches), "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(head) - len(batches) - 1) + "---:|" * len(batches) + "---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"], r["path"]), []).append(r)
    order = {k: i for i, k in enumerate(results["data_order"])}
    for (data, model, path), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] or "", PATHS.index(kv[0][2]))):
        by_batch = {r["batch"]: r for r in rs}
        cells, notes = [], []
        for b in batches:
            r = by_batch.get(b)
            if r is None:
                cells.append("")
            elif r.get("img_per_s") is not None:
                short = r["rounds_used"] < results["repeats"]
                cells.append(fmt(r["img_per_s"], 1) + (f" ({r['rounds_used']}×)" if short else ""))
            else:
                cells.append("–")
                if r["reason"] and r["reason"] not in notes:
                    notes.append(r["reason"])
        label = results["data_labels"][data]
        front = [label, *([model] if kind == "e2e" else []), LABELS[path], rs[0]["dtype"]]
        lines.append("| " + " | ".join([*front, *cells, "; ".join(notes)]) + " |")
    return lines


def analyse(results: dict) -> tuple[list[str], list[str], dict]:
    rows = results["rows"]
    models = results["models"]
    ratios, checks, raw = [], [], {}
    for data in results["data_order"]:
        label = results["data_labels"][data]
        for model in models:
            for b in results["batches"][data]:
                gpu = rate(lookup(rows, "e2e", data, "gpu", model, b))
                peer = rate(lookup(rows, "e2e", data, "peer", model, b))
                nat = rate(lookup(rows, "e2e", data, "native", model, b))
                parts = []
                if gpu and peer:
                    raw[f"{data}/{model}/b{b}/gpu_vs_peer"] = gpu / peer
                    parts.append(f"GPU speciesclf = {gpu / peer:.2f}× the torchvision peer")
                if gpu and nat:
                    raw[f"{data}/{model}/b{b}/gpu_vs_native_cpu"] = gpu / nat
                    parts.append(f"{gpu / nat:.2f}× native CPU at the same batch")
                nat_py = rate(lookup(rows, "e2e", data, "python", model, b))
                if nat and nat_py:
                    raw[f"{data}/{model}/b{b}/native_vs_python_cpu"] = nat / nat_py
                    parts.append(f"native CPU = {nat / nat_py:.2f}× python CPU")
                dal = rate(lookup(rows, "e2e", data, "dali", model, b))
                if gpu and dal:
                    raw[f"{data}/{model}/b{b}/gpu_vs_dali"] = gpu / dal
                    parts.append(f"GPU speciesclf = {gpu / dal:.2f}× DALI")
                if parts:
                    ratios.append(f"- {label}, {model}, b={b}: " + "; ".join(parts))
        for b in results["batches"][data]:
            got = {path: rate(lookup(rows, "pre", data, path, None, b)) for path in PATHS}
            versus = []
            for other in ("peer", "dali", "native"):
                if got["gpu"] and got[other]:
                    raw[f"{data}/pre/b{b}/gpu_vs_{other}"] = got["gpu"] / got[other]
                    versus.append(f"{got['gpu'] / got[other]:.2f}× {LABELS[other]}")
            parts = [f"GPU speciesclf = {', '.join(versus)}"] if versus else []
            if got["native"] and got["python"]:
                raw[f"{data}/pre/b{b}/native_vs_python"] = got["native"] / got["python"]
                parts.append(f"CPU native = {got['native'] / got['python']:.2f}× CPU python")
            if parts:
                ratios.append(f"- {label}, preprocessing only, b={b}: " + "; ".join(parts))
    why_gpu = results["unavailable"].get("gpu")
    no_gpu = "not yet measured: " + (why_gpu or "?")
    pre = lookup(rows, "pre", "shared", "gpu", None, 256)
    if rate(pre):
        v = rate(pre)
        checks.append(f"- GPU preprocessing alone >= 10,000 img/s (shared photos, b=256, {pre['dtype']}): {fmt(v, 1)} img/s — "
                      + ("PASS" if v >= TARGET_PRE else "MISS"))
    else:
        checks.append("- GPU preprocessing alone >= 10,000 img/s (shared photos, b=256): "
                      + (no_gpu if why_gpu else (pre or {}).get("reason") or "not measured: no b=256 row in this run"))
    cores = results["threads"]
    for model in models:
        gpu = lookup(rows, "e2e", "shared", "gpu", model, 256)
        peer = lookup(rows, "e2e", "shared", "peer", model, 256)
        text = f"- GPU end-to-end >= 1.5× the torchvision peer ({model}, b=256, same model and precision): "
        if rate(gpu) and rate(peer):
            v = rate(gpu) / rate(peer)
            checks.append(text + f"{v:.2f}× — " + ("PASS" if v >= TARGET_VS_PEER else "MISS"))
        else:
            missing = gpu if not rate(gpu) else peer
            checks.append(text + (no_gpu if why_gpu else (missing or {}).get("reason") or "not measured: no b=256 row in this run"))
    for model in models:
        gpu = lookup(rows, "e2e", "shared", "gpu", model, 256)
        cpu_rows = [r for r in rows if (r["kind"], r["data"], r["path"], r["model"]) == ("e2e", "shared", "native", model) and rate(r)]
        best = max(cpu_rows, key=rate) if cpu_rows else None
        text = f"- GPU end-to-end >= 5× native CPU on all cores ({model}; GPU at b=256 against the CPU's best batch size; {cores} cores here, the target is stated for 16): "
        if rate(gpu) and best:
            v = rate(gpu) / rate(best)
            raw[f"shared/{model}/gpu_b256_vs_best_native_cpu"] = v
            checks.append(text + f"{v:.2f}× (CPU best at b={best['batch']}: {fmt(rate(best), 1)} img/s) — " + ("PASS" if v >= TARGET_VS_CPU else "MISS"))
        elif why_gpu:
            checks.append(text + no_gpu)
        elif not rate(gpu):
            checks.append(text + ((gpu or {}).get("reason") or "not measured: no b=256 row in this run"))
        else:
            checks.append(text + "not measured: no native CPU row with a figure")
    return ratios, checks, raw


def render(results: dict, ratios: list[str], checks: list[str]) -> str:
    m = results["machine"]
    g = results["gpu"]
    out = [
        f"- CPU: {m['cpu']}, {m['cores']} usable cores; CPU rows use {results['threads']} threads",
        "- GPU: " + (f"{g['name']} (compute {g['capability']}, {g['memory_gib']} GiB; CUDA {g.get('torch_cuda')}, driver {g.get('driver', '?')})" if g else "none visible"),
        f"- Models: {', '.join(f'{k}: {v}' for k, v in results['model_sources'].items())}; GPU {results['precision']} "
        f"(channels_last={results['channels_last']}), CPU fp32",
    ]
    for data in results["data_order"]:
        ds = results["datasets"][data]
        out.append(f"- {ds['label']}: {ds['n']} items ({ds['distinct']} distinct files, {ds['mean_kb']:.0f} KiB each on average, "
                   f"{ds['megapixels']:.2f} MP on average); batches {', '.join(map(str, results['batches'][data]))}")
    out.append(f"- {results['repeats']} timed rounds, at most {results['seconds']} s or one pass over the set per "
               "measurement, medians; a cell marked (k×) has only k rounds (cut by --budget)")
    out += ["", "End to end (encoded bytes in memory → softmax top-1 on the CPU):", "", *table(results, "e2e")]
    out += ["", "Preprocessing only (encoded bytes → model-ready tensor on the path's device):", "", *table(results, "pre")]
    unavailable = results["unavailable"]
    if unavailable:
        out += ["", "Not measured here:", *(f"- {LABELS[k]}: {v}" for k, v in unavailable.items())]
    out += ["", "Ratios (same run):", *(ratios or ["- none: fewer than two paths measured at the same batch size"])]
    out += ["", "Target checks:", *checks]
    par = results.get("parity") or {}
    if par:
        out += ["", f"Preprocessing output vs CPU native float32 ({results['parity_n']} distinct shared photos; mean / max "
                "difference in 1/255 pixel units):"]
        for name, v in par.items():
            out.append(f"- {LABELS[name]}: " + (v["error"] if "error" in v else f"{v['mean']:.3f} / {v['max']:.2f}"))
    spreads = sorted((r["spread_pct"], r) for r in results["rows"] if r.get("rounds_used", 0) > 1)
    if spreads:
        worst = spreads[-1][1]
        out += ["", f"Spread (max - min) / median over the rounds behind each median: median "
                f"{statistics.median(x for x, _ in spreads):.0f}%, worst {spreads[-1][0]:.0f}% ({worst['kind']} "
                f"{worst['data']} {worst['model'] or ''} {LABELS[worst['path']]} b={worst['batch']})."]
    dec = results.get("gpu_decoder") or {}
    if dec.get("decoder") or dec.get("routes") or dec.get("error"):
        out += ["", "GPU speciesclf decoder: " + (dec.get("error") or f"{dec.get('decoder')}; routes of one batch of "
                f"distinct shared photos: {dec.get('routes')}")]
    foreign = results["foreign_cores"]
    if foreign:
        used = [x for x in foreign if x < results["idle_threshold"]]
        left_out = len(foreign) - len(used) if used else 0
        out += ["", f"CPU used by other processes per round (cores): {', '.join(f'{x:.2f}' for x in foreign)}"
                + (f"; {left_out} round(s) at or above {results['idle_threshold']} left out of the medians" if left_out else "")
                + ("" if used else " — WARNING: no quiet round, treat the CPU rows with caution") + "."]
    if results.get("budget_cut"):
        out.append(f"--budget {results['budget']} s: {results['budget_cut']}")
    out.append(loadavg_line(results))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="items in the shared-photo set (default 10000; --quick 256)")
    p.add_argument("--batches", type=parse_ints, default=None, help="batch sizes, shared photos (default 1,32,256; --quick 1,8)")
    p.add_argument("--models", type=parse_names(tuple(_models.MODELS)), default=None,
                   help="models (default mobilenet_v2,resnet50; --quick mobilenet_v2)")
    p.add_argument("--paths", type=parse_names(PATHS), default=list(PATHS), help=f"paths to run (default {','.join(PATHS)})")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16", help="GPU rows' precision (default fp16)")
    p.add_argument("--no-channels-last", action="store_true", help="keep the GPU models in NCHW memory format")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default os.cpu_count())")
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick 1)")
    p.add_argument("--seconds", type=float, default=None, help="time cap per measurement (default 2; --quick 0.3)")
    p.add_argument("--warmup-batches", type=int, default=3, help="untimed batches per GPU row (CPU rows: 1)")
    p.add_argument("--budget", type=float, default=None, help="seconds of measuring after which no new measurement starts")
    p.add_argument("--n12mp", type=int, default=None, help="distinct 12 MP photos (default 32; --quick 4; 0 skips the set)")
    p.add_argument("--images-12mp", type=int, default=None, help="items in the 12 MP set (default 256; --quick 8)")
    p.add_argument("--batches-12mp", type=parse_ints, default=None, help="batch sizes, 12 MP set (default 32; --quick 4)")
    p.add_argument("--parity-n", type=int, default=64, help="distinct photos in the preprocessing parity check (0 skips it)")
    p.add_argument("--no-retry", action="store_true", help="keep every round, quiet or not, and run no extra rounds")
    p.add_argument("--note", default=None, help="a sentence for the RESULTS.md section (where and why this run was made)")
    add_wait_arguments(p)
    add_output_arguments(p, "a ~1 min smoke run: small sets, mobilenet_v2, batches 1 and 8, one round")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    q = args.quick
    images = args.images or (256 if q else 10_000)
    batches = args.batches or ([1, 8] if q else [1, 32, 256])
    models = args.models or (["mobilenet_v2"] if q else ["mobilenet_v2", "resnet50"])
    repeats = args.repeats or (1 if q else 5)
    seconds = args.seconds if args.seconds is not None else (0.3 if q else 2.0)
    n12 = args.n12mp if args.n12mp is not None else (4 if q else 32)
    images12 = args.images_12mp or (8 if q else 256)
    batches12 = args.batches_12mp or ([4] if q else [32])
    if args.max_wait is None:
        args.max_wait = 10.0 if q else 60.0
    if min(images, repeats, args.threads, images12) < 1 or seconds <= 0 or args.warmup_batches < 0:
        p.error("--images, --repeats, --threads, --images-12mp must be >= 1, --seconds > 0, --warmup-batches >= 0")

    t_start = time.perf_counter()
    load_before = loadavg()
    scl = import_speciesclf()
    torch = optional_import("torch")
    if torch is None:
        raise SystemExit("torch is needed for every row (the models are torch modules)")
    tv_io = optional_import("torchvision.io")
    torchvision = optional_import("torchvision")
    dali = optional_import("nvidia.dali")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # taken now: the build described must be the one measured, even if someone reinstalls meanwhile
    machine = machine_info(scl, {"torch": torch, "torchvision": torchvision, "nvidia.dali": dali})

    # ---- data
    photos = shared_photo_paths()
    distinct = [x.read_bytes() for x in photos]
    sets = {"shared": [distinct[i % len(distinct)] for i in range(images)]}
    labels = {"shared": f"shared photos ×{images}"}
    batch_sizes = {"shared": batches}
    info_sets = {"shared": {"distinct_bytes": distinct, "description": f"{shared_dir() / 'images' / 'imagenet-samples'}/*.JPEG"}}
    if n12 > 0:
        big = [x.read_bytes() for x in make_12mp(photos, n12, log)]
        sets["12mp"] = [big[i % len(big)] for i in range(images12)]
        labels["12mp"] = f"12 MP ×{images12}"
        batch_sizes["12mp"] = batches12
        info_sets["12mp"] = {"distinct_bytes": big, "description": f"{W12}x{H12} JPEG q{Q12}, upscaled shared photos"}
    datasets = {}
    for key, items in sets.items():
        d = info_sets[key]["distinct_bytes"]
        mps = []
        for b in d:
            with Image.open(io.BytesIO(b)) as im:
                mps.append(im.size[0] * im.size[1] / 1e6)
        datasets[key] = {"label": labels[key], "n": len(items), "distinct": len(d), "mean_kb": sum(map(len, d)) / len(d) / 1024,
                         "megapixels": sum(mps) / len(mps), "description": info_sets[key]["description"]}

    # ---- what can run here
    device = args.device
    spec_dtype = PRECISIONS[args.precision]
    gpu_dtype = getattr(torch, spec_dtype)
    unavailable: dict[str, str] = {}
    ok, why = gpu_state(torch, scl, device)
    if not ok:
        unavailable["gpu"] = why
    ok, why = peer_state(torch, tv_io, device, distinct[0])
    if not ok:
        unavailable["peer"] = why
    ok, why = dali_state(torch, dali)
    if not ok:
        unavailable["dali"] = why
    for path in PATHS:
        if path not in args.paths:
            unavailable[path] = "left out by --paths"
    cuda_ok = torch.cuda.is_available()
    if cuda_ok:
        torch.backends.cudnn.benchmark = True
    for k, v in unavailable.items():
        log(f"[bench] {LABELS[k]}: not measured: {v}")

    # ---- models: one random-weight instance each, copied to every device/precision
    cpu_models, gpu_models, sources = {}, {}, {}
    for name in models:
        torch.manual_seed(0)
        m, sources[name] = _models.build(name)
        cpu_models[name] = m
        if cuda_ok and any(x not in unavailable for x in GPU_PATHS):
            g = copy.deepcopy(m).to(device=device, dtype=gpu_dtype)
            if not args.no_channels_last:
                g = g.to(memory_format=torch.channels_last)
            gpu_models[name] = g.eval()

    # ---- preprocessors
    max_batch = max(max(v) for v in batch_sizes.values())
    cpu_spec = scl.PreprocessSpec()
    buffer = np.zeros((max_batch, 3, SIZE, SIZE), np.float32)  # shared: the CPU rows never run at once
    pres: dict[str, Any] = {}
    if "python" not in unavailable:
        pres["python"] = CpuPreprocess(scl, torch, cpu_spec, "python", args.threads, buffer)
    if "native" not in unavailable:
        pres["native"] = CpuPreprocess(scl, torch, cpu_spec, "native", args.threads, buffer)
    if "gpu" not in unavailable:
        try:
            gpu_mod = importlib.import_module("speciesclf.preprocessing.gpu")
            pres["gpu"] = GpuPreprocess(gpu_mod, scl.PreprocessSpec(dtype=spec_dtype), device, max_batch)
        except Exception as e:
            unavailable["gpu"] = f"failed to set up: {type(e).__name__}: {e}"
    if "peer" not in unavailable:
        rejected = set()
        for key in sets:
            for b in info_sets[key]["distinct_bytes"]:
                try:
                    tv_io.decode_jpeg([torch.frombuffer(b, dtype=torch.uint8)], mode=tv_io.ImageReadMode.RGB, device=device)
                except Exception:
                    rejected.add(id(b))
        if rejected:
            log(f"[bench] peer: {len(rejected)} distinct photos rejected by the GPU decoder go through torchvision's CPU decoder")
        pres["peer"] = PeerPreprocess(torch, tv_io, device, gpu_dtype, rejected)
    dali_pipes: dict[int, Any] = {}

    def dali_for(batch: int):
        if batch not in dali_pipes:
            dali_pipes[batch] = DaliPreprocess(torch, dali, batch, args.threads, device, gpu_dtype)
        return dali_pipes[batch]

    def sync() -> None:
        torch.cuda.synchronize(device)

    # ---- rows
    rows: list[Row] = []
    for data in sets:
        for path in PATHS:
            gpu_path = path in GPU_PATHS
            dtype = spec_dtype if gpu_path else "float32"
            for b in batch_sizes[data]:
                for model in [None, *models]:
                    row = Row("pre" if model is None else "e2e", data, path, model, b, dtype)
                    rows.append(row)
                    if path in unavailable:
                        row.reason = f"not measured: {unavailable[path]}"
                        continue
                    try:
                        pre = dali_for(b) if path == "dali" else pres[path]
                    except Exception as e:
                        row.reason = f"failed to set up: {type(e).__name__}: {e}"
                        continue
                    if gpu_path:
                        row.sync = sync
                    if model is None:
                        row.run = pre
                    elif path == "gpu":
                        pipelined = PipelinedGpuEndToEnd(torch, pre, gpu_models[model], torch.device(device),
                                                         gpu_dtype, max_batch)
                        row.run = pipelined
                        row.sync = lambda p=pipelined: (p.sync(), sync())
                    elif gpu_path:
                        row.run = end_to_end(torch, pre, gpu_models[model], torch.device(device), gpu_dtype)
                    else:
                        row.run = end_to_end(torch, pre, cpu_models[model], torch.device("cpu"), torch.float32)

    # ---- parity (untimed)
    parity_result = {}
    if args.parity_n > 0:
        sample = distinct[: args.parity_n]
        chunk = min(max_batch, len(sample))
        checks = {k: v for k, v in pres.items() if k != "native"}
        if "dali" not in unavailable:
            try:
                checks["dali"] = dali_for(chunk)
            except Exception as e:
                parity_result["dali"] = {"error": f"{type(e).__name__}: {e}"}
        parity_result.update(parity(scl, checks, sample, chunk))
    gpu_decoder: dict[str, Any] = {}
    if "gpu" in pres:
        # which decoder the measured preprocessor uses, and how one batch of distinct photos was routed
        # (hardware engine, hybrid, CPU fallback): a throughput figure means little without it
        pre = pres["gpu"].pre
        try:
            gpu_decoder["decoder"] = getattr(pre, "decoder", None)
            n = min(max_batch, len(distinct))
            pre(distinct[:n])
            if hasattr(pre, "last_routes"):
                gpu_decoder["routes"] = {"items": n, **pre.last_routes()}
        except Exception as e:
            gpu_decoder["error"] = f"{type(e).__name__}: {e}"

    # ---- measuring
    load = ForeignLoad()
    wait_budget = [float(args.max_wait)]
    t_measure = time.perf_counter()
    deadline = t_measure + args.budget if args.budget else float("inf")
    budget_cut: list[str] = []
    active = sorted([r for r in rows if r.run is not None], key=Row.priority)
    warmed: set[str] = set()

    def failed(row: Row, e: Exception) -> None:
        row.reason = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"[bench] {row.key}: {row.reason}")

    # a row is warmed up when the first round reaches it, right before its first measurement, so that a
    # --budget cut leaves whole rows out (the low-priority ones) rather than warmed rows without figures
    foreign: list[float] = []
    extra = 0 if args.no_retry else repeats
    while active and sum(x < args.idle_threshold for x in foreign) < repeats and len(foreign) < repeats + extra:
        if time.perf_counter() > deadline:
            break
        load.wait_idle(wait_budget, args.idle_threshold, log)
        r_index = len(foreign)
        shift = r_index % len(active)
        a = load.sample()
        t0 = time.perf_counter()
        for row in active[shift:] + active[:shift]:
            if time.perf_counter() > deadline:
                budget_cut.append(f"round {r_index + 1} stopped before {row.key}")
                break
            if row.key not in warmed:
                t1 = time.perf_counter()
                try:
                    for _ in range(max(1, args.warmup_batches) if row.path in GPU_PATHS else 1):
                        row.run(next_batch(row, sets[row.data]))
                    row.sync()
                except Exception as e:
                    failed(row, e)
                    continue
                warmed.add(row.key)
                log(f"[bench] warm-up {row.key}: {time.perf_counter() - t1:.2f} s")
            try:
                n, sec = timed(row, sets[row.data], seconds)
            except Exception as e:
                failed(row, e)
                continue
            row.rates.append(n / sec)
            row.images.append(n)
            row.seconds.append(sec)
            row.rounds.append(r_index)
        foreign.append(load.cores(a, load.sample()))
        active = [r for r in active if r.reason is None]
        log(f"[bench] round {r_index + 1}: {time.perf_counter() - t0:.1f} s; other processes {foreign[-1]:.2f} cores")
    for row in rows:
        if row.run is not None and not row.rates and row.reason is None:
            row.reason = "not measured: --budget spent before it ran"

    results: dict[str, Any] = {
        **run_info(argv),
        "machine": machine,
        "gpu": gpu_info(torch, device),
        "threads": args.threads,
        "precision": args.precision,
        "channels_last": not args.no_channels_last,
        "models": models,
        "model_sources": sources,
        "repeats": repeats,
        "seconds": seconds,
        "budget": args.budget,
        "budget_cut": "; ".join(budget_cut[:3]) + (f" (+{len(budget_cut) - 3} more)" if len(budget_cut) > 3 else "") if budget_cut else None,
        "data_order": list(sets),
        "data_labels": labels,
        "datasets": datasets,
        "batches": batch_sizes,
        "unavailable": {k: v for k, v in unavailable.items()},
        "idle_threshold": args.idle_threshold,
        "foreign_cores": foreign,
        "parity": parity_result,
        "gpu_decoder": gpu_decoder,
        "parity_n": min(args.parity_n, len(distinct)),
        "loadavg_before": load_before,
        "rows": [summarize(r, foreign, args.idle_threshold) for r in rows],
    }
    results["loadavg_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - t_start
    results["measure_s"] = time.perf_counter() - t_measure
    ratios, checks, raw = analyse(results)
    results["ratios"] = raw
    results["checks"] = checks
    body = render(results, ratios, checks)
    g = results["gpu"]
    details = [
        "- GPU: " + (f"{g['name']}, CUDA {g.get('torch_cuda')}, driver {g.get('driver', '?')}" if g else
                     "none visible to this run: every GPU row and GPU target is not yet measured"),
        "- Loops written in the script, one per path: preprocess → model (torch, eval, inference_mode) → softmax → "
        "top-1 class and probability to the CPU; CPU rows fp32 on all threads, GPU rows at the stated precision. "
        f"Measurements capped at {seconds} s or one pass over the set; {repeats} timed rounds after one untimed "
        f"warm-up per row, rows interleaved, medians. The run took {results['wall_s']:.0f} s.",
    ]
    if args.note:
        details.append(f"- Note: {args.note}")
    finish(results, body, args, "cpu_vs_gpu.py — CPU vs GPU, files in memory to predictions", details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
