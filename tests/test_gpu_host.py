"""The GPU path's host side, checked where there is no GPU: the build, the lazy import, the errors."""

from __future__ import annotations

import shutil

import pytest

import speciesclf
from speciesclf import CudaUnavailableError, PreprocessSpec, preprocess_batch
from speciesclf.preprocessing import _cuda


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler on this machine")
def test_cuda_sources_are_compiled_where_nvcc_exists() -> None:
    # CI has nvcc but no GPU: the CUDA module must still be built (a kernel that does not compile fails
    # the build) and must import without a driver.
    built = speciesclf.build_info()
    assert built["cuda"], built
    assert "cuda_error" not in built, built["cuda_error"]
    assert built["nvjpeg"], "nvJPEG was not found at build time (scripts/setup.sh installs nvidia-nvjpeg)"
    module = _cuda.native_cuda()
    assert module.device_count() >= 0
    runtime = module.runtime_info()
    assert runtime["nvjpeg_version"].split(".")[0] == built["cuda_toolkit"].split(".")[0]


def test_gpu_request_without_a_usable_gpu_says_why() -> None:
    usable, why = _cuda.cuda_status()
    if usable:
        pytest.skip("a GPU is usable here: tests/test_gpu.py covers it")
    with pytest.raises(CudaUnavailableError, match="not available") as raised:
        preprocess_batch([b"\xff\xd8"], device="cuda")
    assert why in str(raised.value)
    assert "not usable" in speciesclf.info()["gpu"]


def test_a_build_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(_cuda, "built_with_cuda", lambda: False)
    with pytest.raises(CudaUnavailableError, match="speciesclf was built without CUDA"):
        preprocess_batch([b"x"], device="cuda")
    assert _cuda.cuda_status() == (False, "speciesclf was built without CUDA: GPU preprocessing is not available "
                                          "in this build")


@pytest.mark.parametrize("device", ["gpu", "cuda0", "cpu:1", "mps"])
def test_bad_device_names(device: str) -> None:
    with pytest.raises(ValueError, match="device must be"):
        preprocess_batch([b"x"], device=device)


def test_python_backend_is_cpu_only() -> None:
    with pytest.raises(ValueError, match="CPU"):
        preprocess_batch([b"x"], backend="python", device="cuda")


def test_bfloat16_spec_on_the_cpu_returns_a_torch_tensor() -> None:
    import numpy as np
    import torch

    batch = preprocess_batch([np.zeros((10, 10, 3), np.uint8), b""], PreprocessSpec(dtype="bfloat16"),
                             on_error="skip")
    assert batch.array.dtype == torch.bfloat16
    assert torch.isnan(batch.array[1]).all() and not torch.isnan(batch.array[0]).any()
    with pytest.raises(TypeError, match="bfloat16"):
        preprocess_batch([b"x"], PreprocessSpec(dtype="bfloat16"), out=np.empty((1, 3, 224, 224), np.uint16))


def test_gpu_preprocessing_needs_the_model_on_a_gpu(tmp_path) -> None:
    import torch

    from speciesclf import Classifier

    path = tmp_path / "m.pt"
    with pytest.warns(DeprecationWarning):  # torch.jit is deprecated in torch 2.13, still supported
        torch.jit.script(torch.nn.Flatten()).save(str(path))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="gpu_preprocessing=True"):
        Classifier.load(path, labels=["a"], device="cpu", gpu_preprocessing=True)
    with pytest.raises(ValueError, match="precision must be"):
        Classifier.load(path, labels=["a"], device="cpu", precision="fp8")


def test_onnx_models_keep_their_precision(shared_dir) -> None:
    from speciesclf import Classifier

    model = shared_dir / "models" / "mobilenetv2-12-int8.onnx"
    with pytest.raises(ValueError, match="exported with"):
        Classifier.load(model, labels="imagenet1k", device="cpu", precision="fp16")


@pytest.mark.skipif(not _cuda.built_with_cuda(), reason="speciesclf was built without CUDA")
def test_output_capsule_checks() -> None:
    # run()'s DLPack checks, exercised with CPU tensors (device type 1) since there may be no GPU here.
    import torch

    from speciesclf.preprocessing.preprocess import _DTYPE_CODES

    native = _cuda.native_cuda()

    def check(tensor, dtype="float32", layout=0, rows=2, device_type=1):
        return native._check_output(tensor.__dlpack__(), device_type, 0, 8, _DTYPE_CODES[dtype], layout, rows)

    good = torch.empty((3, 3, 8, 8))
    assert check(good) == good.data_ptr()
    assert check(good[1:]) == good[1:].data_ptr()  # a row offset is honoured
    assert check(torch.empty((2, 8, 8, 3), dtype=torch.bfloat16), "bfloat16", layout=1)
    assert check(torch.empty((2, 3, 8, 8), dtype=torch.uint8), "uint8")
    for tensor, dtype, layout, message in [
        (torch.empty((2, 3, 8, 8), dtype=torch.float16), "float32", 0, "dtype"),
        (torch.empty((2, 3, 8, 8), dtype=torch.float16), "bfloat16", 0, "dtype"),
        (torch.empty((1, 3, 8, 8)), "float32", 0, "shape"),
        (torch.empty((2, 3, 8, 9)), "float32", 0, "shape"),
        (torch.empty((2, 3, 8, 8)), "float32", 1, "shape"),
        (torch.empty((2, 3, 8, 16))[..., ::2], "float32", 0, "contiguous"),
        (torch.empty((2, 8, 8, 3)).permute(0, 3, 1, 2), "float32", 0, "contiguous"),
    ]:
        with pytest.raises(ValueError, match=message):
            check(tensor, dtype, layout)
    with pytest.raises(ValueError, match="cuda:0"):
        check(good, device_type=2)
    with pytest.raises(ValueError, match="dltensor"):
        native._check_output(good.__dlpack__(max_version=(1, 0)), 1, 0, 8, 0, 0, 2)


def test_cli_classify_on_a_missing_gpu_is_one_line(tmp_path, shared_dir) -> None:
    import os
    import subprocess
    import sys

    if _cuda.cuda_status()[0]:
        pytest.skip("a GPU is usable here")
    photo = next((shared_dir / "images" / "imagenet-samples").glob("*.JPEG"))
    env = dict(os.environ, SPECIESCLF_WEIGHTS=str(shared_dir / "models"), SPECIESCLF_HOME=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "speciesclf", "classify", str(photo), "--device", "cuda",
                          "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert run.stderr.startswith("speciesclf: error:") and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, "threads"), ({"threads": -3}, "threads"), ({"threads": 2.5}, "threads"),
    ({"backend": "bogus"}, "backend"), ({"device": "cuda:abc"}, "device"), ({"device": "cuda:-1"}, "device"),
])
def test_bad_gpu_arguments_are_value_errors_on_any_machine(kwargs: dict, message: str) -> None:
    # Checked before anything touches CUDA: the same ValueError with or without a GPU, with or without
    # a CUDA build, as on device="cpu".
    kwargs = {"device": "cuda", **kwargs}
    with pytest.raises(ValueError, match=message):
        preprocess_batch([b"\xff\xd8"], **kwargs)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:12", 0, 3])
def test_cuda_device_names_that_pass_the_check(device) -> None:
    from speciesclf.preprocessing.gpu import check_cuda_device

    check_cuda_device(device)


@pytest.mark.parametrize("device", ["cpu", "cuda:", "cuda:1:2", "CUDA", -1, True, None, 1.0])
def test_cuda_device_names_that_fail_the_check(device) -> None:
    from speciesclf.preprocessing.gpu import check_cuda_device

    with pytest.raises(ValueError, match="device"):
        check_cuda_device(device)
