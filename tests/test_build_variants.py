"""A build without native codecs still decodes everything: Pillow serves what the build left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import io, json, sys
import numpy as np
from PIL import Image
import speciesclf
assert speciesclf.__file__.startswith(sys.argv[1]), speciesclf.__file__
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
encoded = {}
for fmt in ("JPEG", "PNG", "WEBP"):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    encoded[fmt] = buf.getvalue()
items = list(encoded.values()) + [b"", pixels]
native = speciesclf.preprocess_batch(items, backend="native", on_error="skip")
python = speciesclf.preprocess_batch(items, backend="python", on_error="skip")
try:
    speciesclf.preprocess_batch(items[:1], device="cuda")
    gpu_error = None
except speciesclf.CudaUnavailableError as e:
    gpu_error = str(e)
print(json.dumps({
    "codecs": speciesclf.build_info()["codecs"],
    "cuda": speciesclf.build_info()["cuda"],
    "gpu_error": gpu_error,
    "ok": native.ok.tolist(),
    "errors": {str(k): type(v).__name__ for k, v in native.errors.items()},
    "equal": bool(np.array_equal(native.array[native.ok], python.array[python.ok])),
}))
"""


@pytest.mark.slow
def test_build_without_codecs_falls_back_to_pillow(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
         "-Ccmake.define.SPECIESCLF_WITHOUT=jpeg;png;webp", "-Ccmake.define.SPECIESCLF_CUDA=off", "-Cbuild-dir=" + str(tmp_path / "build"), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("speciesclf-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["codecs"] == {}
    assert result["cuda"] is False  # built with SPECIESCLF_CUDA=off: CPU-only is a first-class build
    assert result["gpu_error"].startswith("speciesclf was built without CUDA")
    assert result["ok"] == [True, True, True, False, True]
    assert result["errors"] == {"3": "EmptyInputError"}
    assert result["equal"], "the codec-less build's output differs from the Pillow path"
