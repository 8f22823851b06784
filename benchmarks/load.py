#!/usr/bin/env python3
"""HTTP load: throughput and latency of `speciesclf serve` (dynamic batching on and off) against a plain FastAPI
+ Pillow + ONNX Runtime endpoint, at 1, 8, 32 and 128 concurrent clients, plus an open-loop overload check.

Servers, each a separate process on a free loopback port (127.0.0.1), all with the same model (the shared
MobileNetV2 int8 ONNX, as the built-in ``imagenet1k``; SPECIESCLF_WEIGHTS = the shared models folder,
SPECIESCLF_HOME = a temporary folder):
  a) batching        python3 -m speciesclf serve --model imagenet1k (its defaults: max_batch_size 16, one
                     batch in flight; greedy dispatch)
  b) no batching     the same with --max-batch-size 1
  c) plain FastAPI   a hand-written FastAPI app (written to a temporary folder, run by uvicorn, one worker):
                     the raw body, Pillow preprocessing per request (shorter side to 256 bilinear, center crop
                     224, ImageNet normalisation), ONNX Runtime at batch 1 (intra_op_num_threads=2) in
                     Starlette's thread pool, softmax + top-5 as JSON

Requests: POST the raw JPEG bytes (a) and b): /v1/predict; c): /predict), cycling over the first 50 shared
photos held in memory. The load generator is this process (one asyncio loop, one keep-alive connection per
client with a minimal HTTP/1.1 client, closed loop: each client sends its next request when the last one is
answered) and runs on the same machine
as the server, so it takes CPU from it. Each measurement is a warm-up (2 s; --quick 1 s) then a fixed
duration (8 s; --quick 4 s); throughput counts the 200 answers completed in that window, latencies are
theirs (send to answer). Rounds interleave the servers (each round starting one server later); the table gives medians over
the rounds (3; --quick 1).

Ceiling: once per round, server a)'s classifier (loaded as the service loads it) runs in a process of its own,
fed batches of the service's max_batch_size from the same photos back to back, with no HTTP and no load
generator: the most any server of this classifier could answer on these cores, against which a) and the
2x-over-c) target are read.

Overload: a) is driven open-loop at --overload-factor (4) x the best throughput it reached in the closed-loop
rounds, for 4 s (--quick 3 s), every request with X-Request-Timeout-Ms: 2000. Every request must be answered
(200, 429, 503 or 504; no 500, no connection error) within the deadline + 100 ms (the open-loop generator
is a minimal asyncio HTTP/1.1 client, one connection per request, so that it keeps its rate on 2 cores), and after the last request
is sent a probe (one request at a time) must see normal answers again (3 in a row with status 200 and a latency
under max(50 ms, 3 x a)'s 1-client p50)) within 2 s.

This machine may be shared: before each measurement the script waits, within --max-wait seconds in all, until
other processes use less than --idle-threshold cores; it reports the CPU other processes (not this one, not
the server under test) used during each measurement, and a measurement during which they used more is run
once more.

    python3 benchmarks/load.py                    # full run, ~6 min on 2 cores (plus waits)
    python3 benchmarks/load.py --quick            # ~1.5 min smoke run
    python3 benchmarks/load.py --write-results    # also record the run in benchmarks/RESULTS.md
    python3 benchmarks/load.py --json out.json    # also dump the raw numbers
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ForeignLoad, add_output_arguments, add_wait_arguments, finish, fmt  # noqa: E402
from _harness import import_speciesclf, loadavg, loadavg_line, log, machine_info, run_info, shared_dir  # noqa: E402

HOST = "127.0.0.1"
CONCURRENCY = (1, 8, 32, 128)
N_PHOTOS = 50
DEADLINE_MS = 2000
BATCHED, UNBATCHED, PLAIN = "a) speciesclf, batching", "b) speciesclf, max_batch_size 1", "c) plain FastAPI + Pillow + ORT"
SERVERS = (BATCHED, UNBATCHED, PLAIN)

PLAIN_APP = '''
"""What a user would write by hand: FastAPI, Pillow preprocessing per request, ONNX Runtime at batch 1."""
import io
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

MODEL = os.environ["PLAIN_MODEL"]
LABELS = [line.split("\\t")[2].strip() for line in open(os.environ["PLAIN_LABELS"], encoding="utf-8").readlines()[1:]]
MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
STD = np.asarray((0.229, 0.224, 0.225), np.float32)
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(MODEL, sess_options=options, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name
app = FastAPI()


def preprocess(data):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = (np.asarray(img, dtype=np.float32) / np.float32(255.0) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def infer(data):
    logits = session.run(None, {INPUT: preprocess(data)})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:5]
    return {"label": LABELS[top[0]], "top_k": [{"label": LABELS[i], "score": float(p[i])} for i in top]}


@app.get("/readyz")
def readyz():
    return {"ready": True}


@app.post("/predict")
async def predict(request: Request):
    return await run_in_threadpool(infer, await request.body())
'''


# ---------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], env: dict, path: str, logfile: Path, port: int) -> None:
        self.name, self.path, self.logfile, self.port = name, path, logfile, port
        self.url = f"http://{HOST}:{port}"
        self.log_handle = open(logfile, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log_handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def cpu_s(self) -> float:
        """The server process's user + system CPU seconds so far (from /proc)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def wait_ready(self, timeout: float) -> None:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; log: {self.logfile}\n"
                                 + self.logfile.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} not ready after {timeout:.0f} s; log: {self.logfile}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_handle.close()


def start_servers(tmp: Path, model: Path) -> dict[str, Server]:
    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(model.parent), SPECIESCLF_HOME=str(tmp / "home"),
               PLAIN_MODEL=str(model), PLAIN_LABELS=str(model.parent / "imagenet1k-classes.tsv"),
               PYTHONUNBUFFERED="1")
    (tmp / "plain_app.py").write_text(textwrap.dedent(PLAIN_APP), encoding="utf-8")
    servers: dict[str, Server] = {}
    for name, extra in ((BATCHED, []), (UNBATCHED, ["--max-batch-size", "1"])):
        port = free_port()
        argv = [sys.executable, "-m", "speciesclf", "serve", "--model", "imagenet1k", "--host", HOST,
                "--port", str(port), *extra]
        servers[name] = Server(name, argv, env, "/v1/predict", tmp / f"server-{len(servers)}.log", port)
        servers[name].wait_ready(180)  # one at a time: the first builds the built-in bundle in SPECIESCLF_HOME
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "plain_app:app", "--host", HOST, "--port", str(port), "--workers", "1",
            "--app-dir", str(tmp)]
    servers[PLAIN] = Server(PLAIN, argv, env, "/predict", tmp / "server-plain.log", port)
    servers[PLAIN].wait_ready(120)
    return servers


# ------------------------------------------------------------------------------------------- load: closed


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection with a minimal client: an httpx.AsyncClient with 32 connections
    took half a core of the 2 here (and collapsed at 128 clients), CPU taken from the server under test."""

    def __init__(self, port: int, path: str):
        self.port, self.path = port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> str:
        """The status code, or the error's name (the connection is then reopened by the next call)."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            self.writer.write(f"POST {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Type: image/jpeg\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n".encode("ascii") + body)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode("ascii")
            fields = {k.strip().lower(): v.strip().lower() for k, _, v in
                      (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
            if b"content-length" in fields:
                await self.reader.readexactly(int(fields[b"content-length"]))
            elif fields.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
            if fields.get(b"connection") == b"close":
                self.close()
            return status
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
            self.close()
            return type(e).__name__

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(server: Server, datas: list[bytes], clients: int, warmup: float, duration: float) -> dict:
    """``clients`` keep-alive connections, each posting its next photo as soon as the last one is answered."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counter = [0]
    t_start = time.perf_counter()
    t_begin, t_end = t_start + warmup, t_start + warmup + duration
    connections = [KeepAliveClient(server.port, server.path) for _ in range(clients)]

    async def worker(connection: KeepAliveClient) -> None:
        while True:
            now = time.perf_counter()
            if now >= t_end:
                return
            i = counter[0]
            counter[0] += 1
            t0 = time.perf_counter()
            code = await connection.post(datas[i % len(datas)])
            t1 = time.perf_counter()
            if t_begin <= t1 <= t_end:  # answers completed in the window
                statuses[code] = statuses.get(code, 0) + 1
                if code == "200":
                    latencies.append(t1 - t0)
            if code != "200":
                await asyncio.sleep(0.01)

    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for c in connections:
            c.close()
    lat = np.asarray(latencies) * 1000.0
    ok = len(latencies)
    return {
        "req_per_s": ok / duration,
        "ok": ok,
        "statuses": statuses,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p95_ms": float(np.percentile(lat, 95)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
    }


def measure_cell(server: Server, datas, clients, warmup, duration, load: ForeignLoad) -> dict:
    a, s0 = load.sample(), server.cpu_s()
    cell = asyncio.run(closed_loop(server, datas, clients, warmup, duration))
    b, s1 = load.sample(), server.cpu_s()
    wall = b[0] - a[0]
    own = (b[2] - a[2]) / wall
    srv = (s1 - s0) / wall
    other = max(0.0, ((b[1] - a[1]) / wall) - own - srv)
    cell.update(client_cores=own, server_cores=srv, foreign_cores=other)
    return cell


# ------------------------------------------------------------------------------------------ ceiling: no HTTP

CEILING_SCRIPT = '''
"""server a)'s classifier, loaded as the service loads it, fed batches of max_batch_size back to back."""
import json, os, sys, time
from pathlib import Path
from speciesclf.serve import ServeConfig
from speciesclf.serve.app import _load_classifier

paths, warmup, duration = sys.argv[3:], float(sys.argv[1]), float(sys.argv[2])
datas = [Path(p).read_bytes() for p in paths]
size = ServeConfig().max_batch_size
clf = _load_classifier("imagenet1k")
batches = [[datas[(i + j) % len(datas)] for j in range(size)] for i in range(0, len(datas), size)]
t_end = time.perf_counter() + warmup
while time.perf_counter() < t_end:
    for b in batches:
        clf.predict_batch(b)
n, c0, t0 = 0, time.process_time(), time.perf_counter()
while time.perf_counter() - t0 < duration:
    for b in batches:
        n += sum(p.ok for p in clf.predict_batch(b))
wall = time.perf_counter() - t0
print(json.dumps({"img_per_s": n / wall, "cores": (time.process_time() - c0) / wall}))
'''


def measure_ceiling(tmp: Path, paths: list[Path], warmup: float, duration: float, load: ForeignLoad) -> dict:
    """Server a)'s classifier in a process of its own, without HTTP: what a) could answer at most."""
    script = tmp / "ceiling.py"
    script.write_text(textwrap.dedent(CEILING_SCRIPT), encoding="utf-8")
    model = shared_dir() / "models"
    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(model), SPECIESCLF_HOME=str(tmp / "home"))
    a, child0 = load.sample(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, str(script), str(warmup), str(duration), *map(str, paths)], env=env,
                         capture_output=True, text=True, check=True)
    b, child1 = load.sample(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cell = json.loads(out.stdout.strip().splitlines()[-1])
    wall = b[0] - a[0]
    child = (child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime) / wall
    cell["foreign_cores"] = max(0.0, (b[1] - a[1]) / wall - (b[2] - a[2]) / wall - child)
    return cell


# ------------------------------------------------------------------------------------------ load: overload


async def raw_post(port: int, path: str, body: bytes, timeout_ms: int, limit_s: float) -> str:
    """One POST on a fresh loopback connection with a minimal HTTP/1.1 client (much cheaper than httpx, so
    the open-loop generator keeps its rate on 2 shared cores); returns the status code or the error's name."""
    writer = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: image/jpeg\r\n"
                         f"Content-Length: {len(body)}\r\nX-Request-Timeout-Ms: {timeout_ms}\r\n"
                         "Connection: close\r\n\r\n".encode("ascii") + body)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode("ascii")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            return status
    except TimeoutError:
        return "ClientTimeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        return type(e).__name__
    finally:
        if writer is not None:
            writer.close()


async def open_loop(server: Server, datas: list[bytes], rate: float, duration: float, normal_ms: float) -> dict:
    """Fires at ``rate`` req/s for ``duration`` s with a 2 s deadline header (one connection per request),
    then probes for recovery, one request at a time."""
    limit_s = DEADLINE_MS / 1000.0 + 5.0
    records: list[tuple[str, float, float]] = []  # (status, latency from send s, latency from schedule s)
    n = int(rate * duration)

    async def one(i: int, scheduled: float) -> None:
        t0 = time.perf_counter()
        code = await raw_post(server.port, server.path, datas[i % len(datas)], DEADLINE_MS, limit_s)
        t1 = time.perf_counter()
        records.append((code, t1 - t0, t1 - scheduled))

    tasks = []
    t_start = time.perf_counter()
    for i in range(n):
        scheduled = t_start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    t_stop = time.perf_counter()
    sent_rate = n / (t_stop - t_start)

    # recovery: one request at a time until 3 normal answers in a row
    probes: list[tuple[float, str, float]] = []
    streak, recovered_at, first_normal = 0, None, None
    while time.perf_counter() - t_stop < 15.0:
        p0 = time.perf_counter()
        code = await raw_post(server.port, server.path, datas[len(probes) % len(datas)], DEADLINE_MS, limit_s)
        p1 = time.perf_counter()
        probes.append((round(p1 - t_stop, 3), code, round((p1 - p0) * 1000, 1)))
        if code == "200" and (p1 - p0) * 1000 <= normal_ms:
            streak += 1
            if streak == 1:
                first_normal = p1 - t_stop
            if streak == 3:
                recovered_at = first_normal
                break
        else:
            streak = 0
        await asyncio.sleep(0.02)
    await asyncio.gather(*tasks)
    statuses: dict[str, int] = {}
    for code, _, _ in records:
        statuses[code] = statuses.get(code, 0) + 1
    limit = DEADLINE_MS / 1000.0 + 0.1
    late = sum(1 for _, lat, _ in records if lat > limit)
    late_sched = sum(1 for _, _, lat in records if lat > limit)
    lat = np.asarray([x[1] for x in records]) * 1000
    return {
        "target_rate": rate,
        "sent_rate": sent_rate,
        "duration_s": duration,
        "requests": n,
        "statuses": statuses,
        "late_over_deadline_plus_100ms": late,
        "late_from_schedule": late_sched,
        "max_latency_ms": float(lat.max()) if len(lat) else None,
        "p99_latency_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "recovery_s": recovered_at,
        "normal_ms": normal_ms,
        "probes": probes[:50],
    }


# ---------------------------------------------------------------------------------------------- report


def med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(cells: list[dict]) -> dict:
    quiet = [c for c in cells if not c["busy"]] or cells
    statuses: dict[str, int] = {}
    for c in quiet:
        for k, v in c["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "rounds": len(quiet),
        "req_per_s": med([c["req_per_s"] for c in quiet]),
        "p50_ms": med([c["p50_ms"] for c in quiet]),
        "p95_ms": med([c["p95_ms"] for c in quiet]),
        "p99_ms": med([c["p99_ms"] for c in quiet]),
        "server_cores": med([c["server_cores"] for c in quiet]),
        "client_cores": med([c["client_cores"] for c in quiet]),
        "foreign_max": max(c["foreign_cores"] for c in quiet),
        "spread_pct": 100 * (max(c["req_per_s"] for c in quiet) - min(c["req_per_s"] for c in quiet))
        / max(1e-9, med([c["req_per_s"] for c in quiet])),
        "non_200": {k: v for k, v in statuses.items() if k != "200"},
        "cells": cells,
    }


def render(results: dict) -> tuple[str, list[str]]:
    s = results["summary"]
    lines = [
        f"- {results['n_photos']} photos cycled ({results['mean_kb']:.0f} KiB on average), raw JPEG bodies; "
        f"{results['repeats']} round(s) of {results['warmup_s']:.0f} s warm-up + {results['duration_s']:.0f} s "
        "measured per cell; closed loop, one keep-alive connection per client",
        "- The load generator (a minimal keep-alive HTTP/1.1 client, one event loop) runs on the same 2-core machine as the server: "
        "its CPU (\"client cores\") is taken from the server",
        "",
        "| Server | Clients | req/s | p50 ms | p95 ms | p99 ms | server cores | client cores | spread | non-200 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in SERVERS:
        for c in CONCURRENCY:
            x = s[name][str(c)]
            non = ", ".join(f"{k}: {v}" for k, v in x["non_200"].items()) or "–"
            lines.append(
                f"| {name} | {c} | {fmt(x['req_per_s'], 1)} | {fmt(x['p50_ms'], 1)} | {fmt(x['p95_ms'], 1)} | "
                f"{fmt(x['p99_ms'], 1)} | {x['server_cores']:.2f} | {x['client_cores']:.2f} | "
                f"{x['spread_pct']:.0f}% | {non} |"
            )
    a, b, c = (s[n]["32"] for n in SERVERS)
    ac, ab = a["req_per_s"] / c["req_per_s"], a["req_per_s"] / b["req_per_s"]
    ceiling = s["ceiling"]
    lines += [
        "",
        f"Ceiling without HTTP: server a)'s classifier, loaded as the service loads it, in a process of its own, fed "
        f"batches of its max_batch_size back to back (the 50 photos in memory, no load generator): "
        f"{ceiling['img_per_s']:.0f} img/s using {ceiling['cores']:.2f} cores (median of {len(ceiling['cells'])} "
        "rounds). No server of this classifier can answer more on these cores.",
    ]
    checks = []

    def check(text: str, ok: bool, shown: str) -> None:
        checks.append(f"- {text}: {shown} — {'PASS' if ok else 'MISS'}")

    check("at 32 clients, a) >= 2x c) throughput with p99 no worse", ac >= 2.0 and a["p99_ms"] <= c["p99_ms"],
          f"{ac:.2f}×, p99 {fmt(a['p99_ms'], 1)} vs {fmt(c['p99_ms'], 1)} ms")
    check("at 32 clients, a) >= 1.3x b) throughput with p99 no worse", ab >= 1.3 and a["p99_ms"] <= b["p99_ms"],
          f"{ab:.2f}×, p99 {fmt(a['p99_ms'], 1)} vs {fmt(b['p99_ms'], 1)} ms")
    o = results["overload"]
    st = o["statuses"]
    bad = {k: v for k, v in st.items() if k not in ("200", "429", "503", "504")}
    answered = ", ".join(f"{k}: {v}" for k, v in sorted(st.items()))
    check("overload: every request answered 200/429/503/504 (no 500, no connection error)", not bad,
          f"{o['requests']} requests → {answered}")
    check(f"overload: every answer within the deadline + 100 ms ({DEADLINE_MS + 100} ms)",
          o["late_over_deadline_plus_100ms"] == 0,
          f"{o['late_over_deadline_plus_100ms']} late (max {fmt(o['max_latency_ms'], 1)} ms from send, p99 "
          f"{fmt(o['p99_latency_ms'], 1)} ms; {o['late_from_schedule']} late counted from the scheduled send time)")
    rec = o["recovery_s"]
    check("overload: normal answers again within 2 s after the load stops", rec is not None and rec <= 2.0,
          f"{'never (15 s)' if rec is None else f'{rec:.2f} s'} (normal = 200 in <= {o['normal_ms']:.0f} ms, "
          "3 in a row)")
    if results["busy_cells"]:
        checks.append(f"- note: {results['busy_cells']} measurement(s) saw other processes above the idle threshold "
                      "and were rerun (or kept when no quiet one came)")
    ratios = [
        f"- at 32 clients: a) = {ac:.2f}× c), {ab:.2f}× b) in req/s; b) = {b['req_per_s'] / c['req_per_s']:.2f}× c)",
        f"- ceiling without HTTP = {ceiling['img_per_s'] / c['req_per_s']:.2f}× c) at 32 clients; a) at 32 clients "
        f"reaches {100 * a['req_per_s'] / ceiling['img_per_s']:.0f}% of it (HTTP, the event loop and the load "
        "generator take the rest)",
        f"- best closed-loop throughput of a): {o['best_rate']:.0f} req/s; overload: a) driven open-loop at "
        f"{o['target_rate']:.0f} req/s ({results['overload_factor']:.0f}×) for {o['duration_s']:.0f} s, sent at "
        f"{o['sent_rate']:.0f} req/s, X-Request-Timeout-Ms: {DEADLINE_MS}",
    ]
    lines += ["", "Ratios (same run):", *ratios, "", "Target checks:", *checks, ""]
    worst = max([s[n][str(c)]["foreign_max"] for n in SERVERS for c in CONCURRENCY]
                + [c["foreign_cores"] for c in ceiling["cells"]])
    lines += [
        f"CPU used by other processes (not the load generator, not the server under test) during the measurements "
        f"behind the medians (cores, worst): {worst:.2f}. Server / client cores = that process's CPU time over "
        "wall time; spread = (max - min) / median req/s over the rounds.",
        loadavg_line(results),
    ]
    return "\n".join(lines), checks


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3; --quick 1)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 8; --quick 4)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 2; --quick 1)")
    p.add_argument("--overload-factor", type=float, default=4.0, help="overload rate / best throughput (default 4)")
    add_wait_arguments(p)
    add_output_arguments(p, "a ~1.5 min smoke run: 1 round of 4 s cells")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    duration = args.duration or (4.0 if args.quick else 8.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if args.max_wait is None:
        args.max_wait = 10.0 if args.quick else 60.0

    t_start = time.perf_counter()
    load_before = loadavg()
    speciesclf = import_speciesclf()
    import fastapi
    import httpx
    import onnxruntime as ort
    import uvicorn

    folder = shared_dir() / "images" / "imagenet-samples"
    paths = sorted(Path(x) for x in glob.glob(str(folder / "*.JPEG")))[:N_PHOTOS]
    model = shared_dir() / "models" / "mobilenetv2-12-int8.onnx"
    if not paths or not model.exists():
        raise SystemExit(f"need {folder}/*.JPEG and {model}; set SPECIESCLF_SHARED")
    datas = [x.read_bytes() for x in paths]

    tmp = Path(tempfile.mkdtemp(prefix="speciesclf-load-"))
    log(f"[bench] starting servers (logs in {tmp})")
    servers: dict[str, Server] = {}
    try:
        servers = start_servers(tmp, model)
        load = ForeignLoad()
        budget = [float(args.max_wait)]
        cells: dict[str, dict[str, list[dict]]] = {n: {str(c): [] for c in CONCURRENCY} for n in SERVERS}
        busy_cells = 0
        ceilings: list[dict] = []
        for r in range(repeats):
            order = SERVERS[r % 3:] + SERVERS[: r % 3]
            for name in order:
                for clients in CONCURRENCY:
                    for attempt in range(2):
                        load.wait_idle(budget, args.idle_threshold, log)
                        cell = measure_cell(servers[name], datas, clients, warmup, duration, load)
                        cell["busy"] = cell["foreign_cores"] >= args.idle_threshold
                        cells[name][str(clients)].append(cell)
                        log(f"[bench] round {r + 1} {name} x{clients}: {cell['req_per_s']:.1f} req/s, p50 "
                            f"{fmt(cell['p50_ms'], 1)} p99 {fmt(cell['p99_ms'], 1)} ms, server "
                            f"{cell['server_cores']:.2f} client {cell['client_cores']:.2f} other "
                            f"{cell['foreign_cores']:.2f} cores, {cell['statuses']}")
                        if not cell["busy"]:
                            break
                        busy_cells += 1
            load.wait_idle(budget, args.idle_threshold, log)
            cell = measure_ceiling(tmp, paths, warmup, duration, load)
            ceilings.append(cell)
            log(f"[bench] round {r + 1} ceiling (no HTTP): {cell['img_per_s']:.1f} img/s, {cell['cores']:.2f} cores, "
                f"other {cell['foreign_cores']:.2f}")
        summary = {n: {c: summarize(v) for c, v in per.items()} for n, per in cells.items()}
        summary["ceiling"] = {"img_per_s": med([c["img_per_s"] for c in ceilings]),
                              "cores": med([c["cores"] for c in ceilings]), "cells": ceilings}

        best = max(summary[BATCHED][str(c)]["req_per_s"] for c in CONCURRENCY)
        normal_ms = max(50.0, 3 * summary[BATCHED]["1"]["p50_ms"])
        load.wait_idle(budget, args.idle_threshold, log)
        log(f"[bench] overload: {args.overload_factor:.0f} x {best:.0f} req/s on {BATCHED}")
        overload = asyncio.run(open_loop(servers[BATCHED], datas, args.overload_factor * best,
                                         3.0 if args.quick else 4.0, normal_ms))
        overload["best_rate"] = best
        log(f"[bench] overload: {overload['statuses']}, late {overload['late_over_deadline_plus_100ms']}, "
            f"recovery {overload['recovery_s']}")
        logtext = servers[BATCHED].logfile.read_text(errors="replace")
        overload["server_log_500_lines"] = [ln for ln in logtext.splitlines()
                                            if '"status": 500' in ln or "Traceback" in ln][:10]
    finally:
        for s in servers.values():
            s.stop()

    results: dict[str, Any] = {
        **run_info(argv),
        "machine": machine_info(speciesclf, {"onnxruntime": ort, "fastapi": fastapi, "uvicorn": uvicorn,
                                             "httpx": httpx}),
        "model": str(model),
        "n_photos": len(datas),
        "mean_kb": sum(map(len, datas)) / len(datas) / 1024,
        "repeats": repeats,
        "duration_s": duration,
        "warmup_s": warmup,
        "overload_factor": args.overload_factor,
        "idle_threshold": args.idle_threshold,
        "busy_cells": busy_cells,
        "summary": summary,
        "overload": overload,
        "server_logs": str(tmp),
        "loadavg_before": load_before,
    }
    results["loadavg_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - t_start
    body, checks = render(results)
    results["checks"] = checks
    if overload["server_log_500_lines"]:
        body += "\n\nServer log lines with status 500 or a traceback (a):\n" + "\n".join(
            f"    {ln[:300]}" for ln in overload["server_log_500_lines"])
    from speciesclf.serve import ServeConfig  # the settings server a) runs with

    defaults = ServeConfig()
    details = [
        f"- Model: {results['model']} for every server (a), b): built-in `imagenet1k`, SPECIESCLF_WEIGHTS = its "
        "folder; c): the same file in its own ONNX Runtime session, intra_op_num_threads=2)",
        "- Servers, each its own process on 127.0.0.1: a) `python3 -m speciesclf serve --model imagenet1k` "
        f"(its defaults: max_batch_size {defaults.max_batch_size}, batches_in_flight {defaults.batches_in_flight}, "
        f"greedy dispatch: no wait when idle, max_queue {defaults.max_queue}; ORT without spinning; a batch of "
        "several images runs as parts of up to 8, side by side on a single-threaded session); b) the same with `--max-batch-size 1`; c) a "
        "hand-written FastAPI app under `uvicorn --workers 1`: raw body → Pillow (shorter side 256 bilinear, "
        "center crop 224, normalise) → ORT batch 1 in Starlette's thread pool → softmax top-5 JSON. All log one "
        f"line per request (speciesclf's JSON log / uvicorn's access log). The run took {results['wall_s']:.0f} s.",
        "- Load generator: benchmarks/load.py's KeepAliveClient (httpx, used before 2026-11-27 11:00, cost the "
        "generator about half a core at 32 clients and collapsed at 128).",
    ]
    finish(results, body, args, "load.py — HTTP serving under concurrent load", details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
