"""The GPU path on a real GPU: the same results as the CPU path within the decoders' differences, the
same typed errors, no per-batch allocation in steady state. Skipped, with the reason, where no GPU is
usable (this module's checks that need no GPU are in test_gpu_host.py and test_fused_twin.py).
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from speciesclf import PreprocessSpec, preprocess_batch
from speciesclf.preprocessing.gpu import cuda_status

USABLE, WHY = cuda_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not USABLE, reason=f"no usable GPU: {WHY}")]

# The CPU paths stay within 1.35/255 (mean absolute difference per image) of the torchvision reference
# on the shared photos; the GPU path is held to the same bound against the CPU native path.
MEAN_TOLERANCE = 1.35
# nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: single pixels may differ more.
MAX_TOLERANCE = 40


@contextlib.contextmanager
def quiet_jit():
    """torch.jit warns of its deprecation in newer torch releases (2.13 here), not in older ones (the GPU
    machine's): accept either."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def to_numpy(tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


def unnormalised_difference(gpu: np.ndarray, cpu: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """|gpu - cpu| per image on the 0-255 scale."""
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return np.abs(gpu - cpu) * std * 255.0


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gpu():
    from speciesclf.preprocessing.gpu import GpuPreprocessor

    with GpuPreprocessor(PreprocessSpec()) as pre:
        yield pre


def test_shared_photos_match_the_cpu_path(gpu, photo_bytes: list[bytes]) -> None:
    spec = PreprocessSpec()
    for start in range(0, len(photo_bytes), 128):
        chunk = photo_bytes[start:start + 128]
        on_gpu = to_numpy(gpu(chunk).array)
        on_cpu = preprocess_batch(chunk, spec, backend="native").array
        diff = unnormalised_difference(on_gpu, on_cpu, spec)
        per_image = diff.reshape(len(chunk), -1).mean(axis=1)
        assert per_image.max() <= MEAN_TOLERANCE, (start + int(per_image.argmax()), float(per_image.max()))
        assert diff.max() <= MAX_TOLERANCE
    routes = gpu.last_routes()
    assert routes["nvjpeg_hardware"] + routes["nvjpeg_hybrid"] > 0, routes


def test_pixels_and_cpu_decoded_formats_are_bit_exact(gpu) -> None:
    # Pixel arrays and PNGs are decoded by the CPU core on both paths: only the kernels differ, and they
    # share the CPU path's arithmetic.
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(300, 400, 3), (901, 120, 3), (50, 40),
                                                                       (333, 517, 4)]]
    items = pixels + [encode(pixels[0], "PNG"), encode(pixels[1], "WEBP", lossless=True)]
    for dtype in ("float32", "float16", "bfloat16", "uint8"):
        spec = PreprocessSpec(dtype=dtype)
        on_cpu = preprocess_batch(items, spec, backend="native").array
        on_gpu = preprocess_batch(items, spec, device="cuda").array
        import torch

        expected = on_cpu if dtype == "bfloat16" else torch.from_numpy(on_cpu)
        assert torch.equal(on_gpu.cpu(), expected), dtype


def test_orientations_and_gray(gpu, one_photo: bytes) -> None:
    from test_fused_twin import stored_for

    from speciesclf import decode

    upright = decode(one_photo)
    spec = PreprocessSpec()
    items = []
    for orientation in range(1, 9):
        stored = Image.fromarray(stored_for(upright, orientation))
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
        items.append(buffer.getvalue())
    items.append(encode(np.asarray(Image.fromarray(upright).convert("L")), "JPEG", quality=95))
    on_gpu = to_numpy(gpu(items).array)
    on_cpu = preprocess_batch(items, spec, backend="native").array
    per_image = unnormalised_difference(on_gpu, on_cpu, spec).reshape(len(items), -1).mean(axis=1)
    assert per_image.max() <= MEAN_TOLERANCE, per_image


def test_corrupt_files_give_the_cpu_path_errors(gpu, one_photo: bytes) -> None:
    from test_robustness import SYNTHETIC_CASES, TRUNCATIONS

    bad = {name: build() for name, (build, _) in SYNTHETIC_CASES.items()}
    bad.update({f"truncated-{f}": one_photo[: int(len(one_photo) * f)] for f in TRUNCATIONS})
    items = [one_photo] + list(bad.values()) + [one_photo]
    on_cpu = preprocess_batch(items, PreprocessSpec(), backend="native", on_error="skip")
    on_gpu = gpu(items, on_error="skip")
    assert list(on_gpu.ok) == list(on_cpu.ok)
    for slot, error in on_cpu.errors.items():
        assert type(on_gpu.errors[slot]) is type(error), (list(bad)[slot - 1], on_gpu.errors[slot], error)
    assert np.isnan(to_numpy(on_gpu.array[~on_gpu.ok])).all()
    first, last = to_numpy(on_gpu.array[0]), to_numpy(on_gpu.array[-1])
    assert np.array_equal(first, last)


def test_out_is_checked_and_written_in_place(gpu, one_photo: bytes) -> None:
    import torch

    out = torch.empty((4, 3, 224, 224), device=gpu.device)
    batch = gpu([one_photo, one_photo], out=out)
    assert batch.array.data_ptr() == out.data_ptr()
    for wrong in (torch.empty((4, 3, 224, 224), device=gpu.device, dtype=torch.float16),
                  torch.empty((1, 3, 224, 224), device=gpu.device),
                  torch.empty((4, 224, 224, 3), device=gpu.device),
                  torch.empty((4, 3, 224, 224)),
                  torch.empty((4, 3, 224, 448), device=gpu.device)[..., ::2]):
        with pytest.raises((ValueError, TypeError)):
            gpu([one_photo, one_photo], out=wrong)


def test_steady_state_allocates_nothing(gpu, photo_bytes: list[bytes]) -> None:
    import torch

    batch = photo_bytes[:64]
    out = torch.empty((64, 3, 224, 224), device=gpu.device)
    for _ in range(3):
        gpu(batch, out=out)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    for _ in range(10):
        gpu(batch, out=out)
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after == free_before


def test_threads_with_their_own_preprocessors(photo_bytes: list[bytes]) -> None:
    from speciesclf.preprocessing.gpu import GpuPreprocessor

    expected = to_numpy(preprocess_batch(photo_bytes[:32], device="cuda").array)
    results, errors = {}, []

    def work(k: int) -> None:
        try:
            with GpuPreprocessor(PreprocessSpec()) as pre:
                for _ in range(3):
                    results[k] = to_numpy(pre(photo_bytes[:32]).array)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(4):
        assert np.array_equal(results[k], expected)


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """A TorchScript model whose answer depends only on the mean colour: robust to fp16 and to the
    decoders' small differences, so CPU and GPU runs must agree."""
    import torch

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            mean = x.float().mean(dim=(2, 3))
            return torch.stack([mean[:, 0] - mean[:, 1], mean[:, 1] - mean[:, 2], mean[:, 2] - mean[:, 0]], 1) * 4

    path = tmp_path_factory.mktemp("model") / "colour.pt"
    with quiet_jit():
        torch.jit.script(MeanColour()).save(str(path))
    return path


@pytest.mark.parametrize("precision, graphs", [("fp32", False), ("fp16", True), ("bf16", False)])
def test_classifier_on_the_gpu_agrees_with_the_cpu(colour_model, photo_bytes, precision, graphs) -> None:
    from speciesclf import Classifier

    labels = ["red-green", "green-blue", "blue-red"]
    with quiet_jit():
        cpu = Classifier.load(colour_model, labels=labels, device="cpu", batch_size=32)
        gpu = Classifier.load(colour_model, labels=labels, device="cuda", precision=precision, batch_size=32,
                              runtime_options={"cuda_graphs": graphs})
    assert gpu._engine.gpu is not None and gpu.device.startswith("cuda")
    photos = photo_bytes[:100] + [b"not an image"]
    on_cpu, on_gpu = cpu.predict_batch(photos), gpu.predict_batch(photos)
    assert on_gpu[-1].error is not None and type(on_gpu[-1].error) is type(on_cpu[-1].error)
    tolerance = {"fp32": 0.01, "fp16": 0.02, "bf16": 0.05}[precision]
    for a, b in zip(on_cpu[:-1], on_gpu[:-1]):
        assert abs(dict(a.top_k)[a.label] - dict(b.top_k).get(a.label, 0.0)) <= tolerance
    agree = sum(a.label == b.label for a, b in zip(on_cpu[:-1], on_gpu[:-1]))
    assert agree >= 97, agree
