"""The public surface: PreprocessSpec, Batch, backend selection, info(), the CLI, __all__."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import speciesclf
from speciesclf import Batch, PreprocessSpec, preprocess_batch
from speciesclf.preprocessing import _backend
from speciesclf.preprocessing import preprocess as preprocess_module

from conftest import REPO_ROOT


def jpeg(height: int = 40, width: int = 60, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --- PreprocessSpec ------------------------------------------------------------------------------------

INVALID_SPECS = {
    "size 0": dict(size=0),
    "size negative": dict(size=-224),
    "size float": dict(size=224.0),
    "size bool": dict(size=True),
    "resize 0": dict(resize=0),
    "resize < size": dict(size=224, resize=223),
    "resize float": dict(resize=256.5),
    "crop": dict(crop="random"),
    "dtype": dict(dtype="float64"),
    "dtype int8": dict(dtype="int8"),
    "layout": dict(layout="CHW"),
    "layout lowercase": dict(layout="nchw"),
    "interpolation": dict(interpolation="nearest"),
    "interpolation lanczos": dict(interpolation="lanczos"),
    "mean too short": dict(mean=(0.5, 0.5)),
    "mean too long": dict(mean=(0.5, 0.5, 0.5, 0.5)),
    "std too short": dict(std=(0.5,)),
    "std negative": dict(std=(0.2, -0.2, 0.2)),
    "std zero": dict(std=(0.2, 0.0, 0.2)),
    "jpeg_reduce_margin < 1": dict(jpeg_reduce_margin=0.99),
    "jpeg_reduce_margin 0": dict(jpeg_reduce_margin=0),
    "jpeg_reduce_margin nan": dict(jpeg_reduce_margin=float("nan")),
    "max_pixels 0": dict(max_pixels=0),
    "max_bytes negative": dict(max_bytes=-1),
}


@pytest.mark.parametrize("name", sorted(INVALID_SPECS))
def test_spec_validation(name):
    with pytest.raises(ValueError):
        PreprocessSpec(**INVALID_SPECS[name])


def test_spec_defaults_are_the_imagenet_recipe():
    spec = PreprocessSpec()
    assert (spec.size, spec.resize, spec.crop, spec.interpolation) == (224, 256, "center", "bilinear")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert (spec.dtype, spec.layout) == ("float32", "NCHW")
    assert spec.numpy_dtype == np.float32
    assert spec.output_shape(5) == (5, 3, 224, 224)
    assert PreprocessSpec(layout="NHWC", size=96, resize=None).output_shape(2) == (2, 96, 96, 3)


def test_spec_valid_edge_values():
    PreprocessSpec(size=1, resize=1)
    PreprocessSpec(size=256, resize=256)
    PreprocessSpec(resize=None)
    PreprocessSpec(jpeg_reduce_margin=1.0)
    PreprocessSpec(jpeg_reduce_margin=None)
    spec = PreprocessSpec(mean=[0, 0, 0], std=np.array([1, 2, 3]))  # any sequence, stored as float tuples
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 2.0, 3.0)
    assert all(type(v) is float for v in spec.std)


def test_spec_is_frozen_and_hashable():
    spec = PreprocessSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.size = 100  # type: ignore[misc]
    assert hash(spec) == hash(PreprocessSpec())
    assert spec == PreprocessSpec() and spec != PreprocessSpec(size=200)


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(size=160, resize=None, interpolation="bicubic", dtype="uint8", layout="NHWC"),
        PreprocessSpec(mean=(0.5, 0.5, 0.5), std=(0.1, 0.2, 0.3), jpeg_reduce_margin=None, max_pixels=1000, max_bytes=10),
    ],
)
def test_spec_dict_roundtrip(spec):
    data = spec.to_dict()
    assert PreprocessSpec.from_dict(data) == spec
    # Through JSON (lists instead of tuples) too: a spec saved next to a model.
    restored = PreprocessSpec.from_dict(json.loads(json.dumps(data)))
    assert restored == spec and isinstance(restored.mean, tuple) and isinstance(restored.std, tuple)
    assert set(data) == {f.name for f in dataclasses.fields(PreprocessSpec)}


def test_spec_from_dict_rejects_unknown_fields_and_validates():
    with pytest.raises(ValueError, match="unknown"):
        PreprocessSpec.from_dict({"size": 224, "colour": "blue"})
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({"size": 0})
    assert PreprocessSpec.from_dict({}) == PreprocessSpec()
    assert PreprocessSpec.from_dict({"size": 100, "resize": 120}).size == 100


# --- Batch ---------------------------------------------------------------------------------------------

def test_batch_valid_and_ok():
    good = jpeg()
    for backend in ("native", "python"):
        batch = preprocess_batch([good, b"", good, None, good], backend=backend, on_error="skip")
        assert isinstance(batch, Batch)
        assert len(batch) == 5 and not batch.all_ok
        assert batch.ok.dtype == bool and list(batch.ok) == [True, False, True, False, True]
        assert sorted(batch.errors) == [1, 3]
        valid = batch.valid()
        assert valid.shape == (3, 3, 224, 224)
        assert np.array_equal(valid, batch.array[[0, 2, 4]])
        assert np.isfinite(valid).all()

        clean = preprocess_batch([good, good], backend=backend)
        assert clean.all_ok and clean.errors == {} and clean.valid() is clean.array


def test_batch_is_frozen():
    batch = preprocess_batch([jpeg()])
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.ok = None  # type: ignore[misc]


def test_items_may_be_any_iterable_and_mixed():
    data = jpeg()
    pixels = speciesclf.decode(data)
    image = Image.fromarray(pixels)
    spec = PreprocessSpec(size=32, resize=None, dtype="uint8")
    for backend in ("native", "python"):
        from_list = preprocess_batch([data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)], spec, backend=backend)
        assert from_list.all_ok
        assert all(np.array_equal(from_list.array[0], from_list.array[i]) for i in range(1, 4))
        from_generator = preprocess_batch((x for x in [data, pixels, image]), spec, backend=backend)
        assert from_generator.all_ok and len(from_generator) == 3
        assert np.array_equal(from_generator.array[1], from_generator.array[2])


# --- backend selection ---------------------------------------------------------------------------------

def test_backend_bogus():
    with pytest.raises(ValueError):
        preprocess_batch([jpeg()], backend="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        speciesclf.decode(jpeg(), backend="bogus")


def test_env_bogus_backend(monkeypatch):
    monkeypatch.setenv("SPECIESCLF_BACKEND", "cuda")
    with pytest.raises(ValueError):
        preprocess_batch([jpeg()])


def test_env_forces_python_for_auto(monkeypatch):
    """SPECIESCLF_BACKEND=python replaces "auto"; the native core is then never called."""
    calls = []
    real_native = preprocess_module._run_native

    def spy(*args, **kwargs):
        calls.append(1)
        return real_native(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "_run_native", spy)
    data = jpeg()

    monkeypatch.delenv("SPECIESCLF_BACKEND", raising=False)
    assert _backend.resolve("auto") == ("native" if _backend.native_available() else "python")
    preprocess_batch([data])
    assert len(calls) == (1 if _backend.native_available() else 0)

    calls.clear()
    for value in ("python", "PYTHON", " python "):
        monkeypatch.setenv("SPECIESCLF_BACKEND", value)
        assert _backend.resolve("auto") == "python"
        preprocess_batch([data])  # backend="auto"
        preprocess_batch([data], backend="auto")
        assert speciesclf.info()["backend"] == "python"
    assert calls == [], "the native core ran although SPECIESCLF_BACKEND=python"

    # An explicit choice wins over the environment.
    if _backend.native_available():
        preprocess_batch([data], backend="native")
        assert calls == [1]


@pytest.mark.skipif(not _backend.native_available(), reason="needs the native extension")
def test_env_python_changes_which_codec_reports(monkeypatch):
    """The two backends agree on pixels but not on the codec's own words: auto follows the env."""
    broken = b"\xff\xd8\xff\xe0" + b"\x00" * 40  # a JPEG start and nothing usable
    def message(**kwargs):
        batch = preprocess_batch([broken], on_error="skip", **kwargs)
        return str(batch.errors[0])

    native, python = message(backend="native"), message(backend="python")
    assert native != python and "Pillow" in python and "Pillow" not in native
    monkeypatch.setenv("SPECIESCLF_BACKEND", "python")
    assert message() == python
    monkeypatch.setenv("SPECIESCLF_BACKEND", "native")
    assert message() == native
    monkeypatch.delenv("SPECIESCLF_BACKEND")
    assert message() == native


def test_num_threads_env(monkeypatch):
    monkeypatch.setenv("SPECIESCLF_NUM_THREADS", "3")
    assert _backend.default_threads() == 3
    assert speciesclf.info()["threads"] == 3
    monkeypatch.setenv("SPECIESCLF_NUM_THREADS", "0")
    with pytest.raises(ValueError):
        preprocess_batch([jpeg()])


# --- info ----------------------------------------------------------------------------------------------

def test_info_keys():
    info = speciesclf.info()
    for key in ("version", "native", "codecs", "threads", "simd", "cuda"):
        assert key in info, key
    assert info["version"] == speciesclf.__version__
    assert isinstance(info["native"], bool) and info["native"] == _backend.native_available()
    assert isinstance(info["codecs"], dict)
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert isinstance(info["simd"], list)
    assert isinstance(info["cuda"], bool)
    json.dumps(info)  # serialisable, as `speciesclf info --json` prints it


def test_build_info_codecs():
    built = speciesclf.build_info()
    assert built["version"] == speciesclf.__version__
    if not _backend.native_available():
        assert built["codecs"] == {}
        pytest.skip(f"native extension not built: {_backend.NATIVE_IMPORT_ERROR}")
    assert set(built["codecs"]) >= {"jpeg", "png", "webp"}, built["codecs"]
    assert all(isinstance(v, str) and v for v in built["codecs"].values())
    assert isinstance(built["cuda"], bool)


def test_all_names_exist():
    assert speciesclf.__all__, "empty __all__"
    assert len(set(speciesclf.__all__)) == len(speciesclf.__all__)
    for name in speciesclf.__all__:
        assert hasattr(speciesclf, name), name
    for name in ("preprocess_batch", "decode", "PreprocessSpec", "Batch", "ImageError", "info", "build_info"):
        assert name in speciesclf.__all__


def test_error_hierarchy():
    errors = [
        speciesclf.EmptyInputError,
        speciesclf.UnsupportedFormatError,
        speciesclf.DecodeError,
        speciesclf.ImageTooLargeError,
        speciesclf.InvalidImageError,
        speciesclf.ImageReadError,
    ]
    for error in errors:
        assert issubclass(error, speciesclf.ImageError) and issubclass(speciesclf.ImageError, Exception)
    assert issubclass(speciesclf.InvalidImageError, TypeError)
    assert issubclass(speciesclf.ImageReadError, OSError)
    assert issubclass(speciesclf.DecodeError, ValueError)


# --- CLI -----------------------------------------------------------------------------------------------

def cli(*args: str, module: bool = True, cwd=None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECIESCLF_BACKEND"}
    env["PYTHONWARNINGS"] = "error"
    env.update(env_extra or {})
    if module:
        command = [sys.executable, "-m", "speciesclf", *args]
    else:
        scripts = os.path.dirname(sys.executable)
        executable = os.path.join(scripts, "speciesclf")
        if not os.path.exists(executable):
            pytest.skip("the speciesclf console script is not installed next to this Python")
        command = [executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd or REPO_ROOT.parent, env=env)


def test_cli_info():
    result = cli("info")
    assert result.returncode == 0, result.stderr
    assert "version" in result.stdout and speciesclf.__version__ in result.stdout
    assert result.stderr == ""


def test_cli_info_json():
    for module in (True, False):
        result = cli("info", "--json", module=module)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        for key in ("version", "native", "codecs", "threads", "simd", "cuda"):
            assert key in data
        assert data["version"] == speciesclf.__version__


def test_cli_preprocess(tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, fmt in (("a.jpg", "JPEG"), ("b.png", "PNG"), ("nested/c.webp", "WEBP")):
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / name, fmt)
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "batch.npy"
    result = cli("preprocess", str(folder), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "3/3 images" in result.stdout
    array = np.load(output)
    assert array.shape == (3, 3, 224, 224) and array.dtype == np.float32
    expected = preprocess_batch(sorted(p for p in folder.rglob("*") if p.suffix != ".txt" and p.is_file()))
    assert np.array_equal(array, expected.array)

    result = cli("preprocess", str(folder), "--size", "64", "--resize", "0", "--dtype", "uint8", "--layout", "NHWC",
                 "--backend", "python", "--threads", "1", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert np.load(output).shape == (3, 64, 64, 3)


def test_cli_preprocess_reports_bad_files(tmp_path):
    (tmp_path / "good.jpg").write_bytes(jpeg())
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    result = cli("preprocess", str(tmp_path))
    assert result.returncode == 1
    assert "1/2 images" in result.stdout
    assert "bad.jpg" in result.stderr and "UnsupportedFormatError" in result.stderr


def test_cli_usage_errors():
    assert cli().returncode == 2
    assert cli("frobnicate").returncode == 2
