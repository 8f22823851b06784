"""decode() of every format and variant both backends read, EXIF orientation, and malformed EXIF.

The expectation is Pillow's ``np.asarray(Image.open(f).convert("RGB"))`` (after ``ImageOps.exif_transpose``
where a file carries an orientation): exact for lossless formats, a small tolerance for lossy ones (the
native core links the system's codec libraries, Pillow its own). The one documented deviation: 16-bit gray
keeps its high byte (v >> 8) where Pillow's convert saturates at 255.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

import speciesclf
from speciesclf.preprocessing import _formats
from speciesclf import PreprocessSpec, preprocess_batch
from reference import to_pixels

BACKENDS = ("native", "python")
H, W = 37, 53  # odd sizes: partial MCUs, partial bytes in packed rows, every Adam7 pass non-trivial


# --- image content and encoders ------------------------------------------------------------------------

def content(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """Non-symmetric RGB content: gradients, a marked corner, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 3 + y * 7) % 256], axis=-1)
    image = image + rng.integers(-6, 7, image.shape)
    image[: height // 5 + 1, : width // 5 + 1] = (250, 20, 20)  # top-left marker: orientation is visible
    return np.clip(image, 0, 255).astype(np.uint8)


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def _pack_rows(samples: np.ndarray, bit_depth: int) -> np.ndarray:
    """(h, w*channels) sample values -> (h, bytes) scanlines at bit_depth bits per sample."""
    if bit_depth == 16:
        return samples.astype(">u2").view(np.uint8).reshape(samples.shape[0], -1)
    if bit_depth == 8:
        return samples.astype(np.uint8)
    per_byte = 8 // bit_depth
    h, n = samples.shape
    padded = np.zeros((h, -(-n // per_byte) * per_byte), dtype=np.uint16)
    padded[:, :n] = samples
    groups = padded.reshape(h, -1, per_byte)
    shifts = np.arange(per_byte - 1, -1, -1) * bit_depth
    return (groups << shifts).sum(axis=-1).astype(np.uint8)


def png_encode(
    samples: np.ndarray,
    bit_depth: int,
    color_type: int,
    *,
    interlace: bool = False,
    palette: bytes | None = None,
    trns: bytes | None = None,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A PNG written by hand, for the variants Pillow does not write (16-bit, 1/2/4-bit, Adam7).

    ``samples`` is (h, w) or (h, w, channels) of sample values (uint16 for 16-bit).
    """
    h, w = samples.shape[:2]
    samples = samples.reshape(h, w, -1)
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        sub = samples[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        for row in _pack_rows(sub.reshape(sub.shape[0], -1), bit_depth):
            raw += b"\x00" + row.tobytes()  # filter type 0
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, int(interlace)))]
    chunks += [png_chunk(kind, payload) for kind, payload in extra]
    if palette is not None:
        chunks.append(png_chunk(b"PLTE", palette))
    if trns is not None:
        chunks.append(png_chunk(b"tRNS", trns))
    chunks.append(png_chunk(b"IDAT", zlib.compress(bytes(raw))))
    chunks.append(png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


# Pillow warns when it converts a palette image whose tRNS chunk is a table of alphas, and when a JPEG's
# EXIF is corrupt (it reads the EXIF for the DPI while opening). Dedicated tests check that decoding does
# not leak these (test_palette_alpha_table_decodes_without_warning, test_malformed_exif_leaks_no_warning);
# the pixel comparisons tolerate exactly these messages so that they test the pixels.
PILLOW_WARNINGS = "Palette images with Transparency expressed in bytes|Corrupt EXIF data|Truncated File Read"


def pillow_rgb(data: bytes, transpose: bool = False) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PILLOW_WARNINGS, category=UserWarning)
        with Image.open(io.BytesIO(data)) as image:
            if transpose:
                image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))


def decode_both(data: bytes, **kwargs) -> dict[str, np.ndarray]:
    out = {}
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PILLOW_WARNINGS, category=UserWarning)
            array = speciesclf.decode(data, backend=backend, **kwargs)
        assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
        out[backend] = array
    return out


def assert_close(actual: np.ndarray, expected: np.ndarray, *, max_diff: int = 0, mean_diff: float = 0.0, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= max_diff, f"{what}: max |diff| {diff.max()} > {max_diff} at {np.argwhere(diff > max_diff)[:3].tolist()}"
    assert diff.mean() <= mean_diff + 1e-12, f"{what}: mean |diff| {diff.mean():.4f} > {mean_diff}"


# --- the formats ---------------------------------------------------------------------------------------

RGB = content()
ALPHA = np.where((np.arange(H)[:, None] + np.arange(W)[None, :]) % 5 == 0, 0, (np.arange(W) * 4 + 20) % 256)
ALPHA = np.broadcast_to(ALPHA, (H, W)).astype(np.uint8)  # ramps, with fully transparent pixels
RGBA = np.dstack([RGB, ALPHA])
GRAY = RGB[:, :, 1].copy()
RNG = np.random.default_rng(7)


def _palette_image() -> Image.Image:
    return Image.fromarray(RGB).quantize(colors=64)


def _lossless_cases() -> dict[str, bytes]:
    cases = {
        "png-rgb": save(Image.fromarray(RGB), "PNG"),
        "png-rgba": save(Image.fromarray(RGBA, "RGBA"), "PNG"),
        "png-gray": save(Image.fromarray(GRAY, "L"), "PNG"),
        "png-gray-alpha": save(Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"), "PNG"),
        "png-palette": save(_palette_image(), "PNG"),
        "png-palette-trns": save(_palette_image(), "PNG", transparency=3),
        "png-palette-trns-table": save(_palette_image(), "PNG", transparency=bytes(range(0, 256, 4))),
        "png-rgb16": png_encode(RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16), 16, 2),
        "png-rgb-trns": png_encode(RGB, 8, 2, trns=struct.pack(">HHH", *RGB[0, 0])),
        "png-gray-trns": png_encode(GRAY, 8, 0, trns=struct.pack(">H", int(GRAY[3, 3]))),
        "png-interlaced-rgb": png_encode(RGB, 8, 2, interlace=True),
        "png-interlaced-rgba": png_encode(RGBA, 8, 6, interlace=True),
        "png-interlaced-gray2": png_encode(RNG.integers(0, 4, (H, W), dtype=np.uint8), 2, 0, interlace=True),
        "png-interlaced-rgb16": png_encode(RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16), 16, 2, interlace=True),
        "webp-lossless": save(Image.fromarray(RGB), "WEBP", lossless=True),
        # Alpha, but no pixel fully transparent (see WEBP_TRANSPARENT for those).
        "webp-lossless-alpha": save(Image.fromarray(np.dstack([RGB, np.maximum(ALPHA, 1)]), "RGBA"), "WEBP", lossless=True),
        "gif": save(_palette_image(), "GIF"),
        "gif-transparency": save(_palette_image(), "GIF", transparency=3),
        "bmp": save(Image.fromarray(RGB), "BMP"),
        "bmp-gray": save(Image.fromarray(GRAY, "L"), "BMP"),
        "tiff": save(Image.fromarray(RGB), "TIFF"),
        "tiff-deflate-rgba": save(Image.fromarray(RGBA, "RGBA"), "TIFF", compression="tiff_adobe_deflate"),
    }
    for bits in (1, 2, 4):
        cases[f"png-gray{bits}"] = png_encode(RNG.integers(0, 2**bits, (H, W), dtype=np.uint8), bits, 0)
    palette = bytes(RNG.integers(0, 256, 16 * 3, dtype=np.uint8))
    cases["png-palette4"] = png_encode(RNG.integers(0, 16, (H, W), dtype=np.uint8), 4, 3, palette=palette)
    return cases


LOSSLESS = _lossless_cases()

LOSSY = {
    "jpeg-baseline": save(Image.fromarray(RGB), "JPEG", quality=90),
    "jpeg-baseline-444": save(Image.fromarray(RGB), "JPEG", quality=95, subsampling=0),
    "jpeg-progressive": save(Image.fromarray(RGB), "JPEG", quality=90, progressive=True),
    "jpeg-gray": save(Image.fromarray(GRAY, "L"), "JPEG", quality=90),
    "jpeg-cmyk": save(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=90),
    "jpeg-cmyk-progressive": save(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=90, progressive=True),
    "jpeg-restart-markers": save(Image.fromarray(RGB), "JPEG", quality=90, restart_marker_blocks=2),
    "webp-lossy": save(Image.fromarray(RGB), "WEBP", quality=90),
}

# WebP with an alpha channel and fully transparent pixels that still carry colour: lossy WebP keeps
# (approximately) the RGB under alpha 0, lossless with exact=True keeps it exactly, and plain lossless
# stores whatever predicts best. Pillow's convert("RGB") drops the alpha and keeps that colour.
WEBP_TRANSPARENT = {
    "webp-lossless-alpha-transparent": (save(Image.fromarray(RGBA, "RGBA"), "WEBP", lossless=True), 0),
    "webp-lossy-alpha": (save(Image.fromarray(RGBA, "RGBA"), "WEBP", quality=90), 3),
    "webp-lossless-alpha-exact": (save(Image.fromarray(RGBA, "RGBA"), "WEBP", lossless=True, exact=True), 0),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_formats_exact(name):
    data = LOSSLESS[name]
    expected = pillow_rgb(data)
    for backend, array in decode_both(data).items():
        assert_close(array, expected, what=f"{name} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_palette_alpha_table_decodes_without_warning(backend):
    """A PNG-8 with an alpha table (tRNS with one alpha per palette entry) is common on the web.

    Reading it must not leak Pillow's UserWarning to the caller: under warnings-as-errors (this project's
    own pytest configuration) the warning becomes an exception that is no ImageError and escapes
    preprocess_batch(on_error="skip").
    """
    data = LOSSLESS["png-palette-trns-table"]
    expected = pillow_rgb(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array = speciesclf.decode(data, backend=backend)
        batch = preprocess_batch([data], PreprocessSpec(size=16, resize=None), backend=backend, on_error="skip")
    assert np.array_equal(array, expected)
    assert batch.all_ok


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_formats(name):
    data = LOSSY[name]
    expected = pillow_rgb(data)
    decoded = decode_both(data)
    for backend, array in decoded.items():
        assert_close(array, expected, max_diff=3, mean_diff=0.25, what=f"{name} {backend}")
    assert_close(decoded["native"], decoded["python"], max_diff=3, mean_diff=0.25, what=f"{name} native vs python")


@pytest.mark.parametrize("name", sorted(WEBP_TRANSPARENT))
def test_webp_alpha_with_fully_transparent_pixels(name):
    data, tolerance = WEBP_TRANSPARENT[name]
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGBA"
        alpha = np.asarray(image)[:, :, 3]
    transparent = alpha == 0
    assert transparent.any() and not transparent.all()
    expected = pillow_rgb(data)
    assert expected[transparent].any(), "the encoder kept colour under alpha 0: the case this test needs"
    decoded = decode_both(data)
    for backend, array in decoded.items():
        assert_close(array, expected, max_diff=tolerance, mean_diff=0.25, what=f"{name} {backend}")
    assert_close(decoded["native"], decoded["python"], max_diff=tolerance, mean_diff=0.25, what=f"{name} native vs python")


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "interlaced"])
def test_png_gray16_keeps_the_high_byte(interlace):
    """The documented deviation: 16-bit gray is v >> 8, where Pillow's convert("RGB") saturates at 255."""
    values = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
    values[0, :4] = (0, 255, 256, 65535)
    data = png_encode(values, 16, 0, interlace=interlace)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I")
        stored = np.asarray(image).astype(np.int64)
    assert np.array_equal(stored, values)
    high = (values >> 8).astype(np.uint8)
    expected = np.dstack([high, high, high])
    for backend, array in decode_both(data).items():
        assert_close(array, expected, what=backend)
    # ... and this is a real deviation from Pillow, not a coincidence of the test data.
    assert not np.array_equal(pillow_rgb(data), expected)


def test_png_gray16_preprocess_agrees():
    values = RNG.integers(0, 65536, (64, 80), dtype=np.uint16)
    data = png_encode(values, 16, 0)
    high = (values >> 8).astype(np.uint8)
    spec = PreprocessSpec(dtype="uint8")
    outs = [preprocess_batch([data], spec, backend=b).array for b in BACKENDS]
    assert np.abs(outs[0].astype(np.int16) - outs[1]).max() <= 1
    assert np.array_equal(outs[1], preprocess_batch([high], spec, backend="python").array)


def test_animated_gif_and_webp_first_frame():
    frames = [Image.fromarray(content(seed=s)) for s in range(3)]
    gif = save(frames[0].quantize(64), "GIF", save_all=True, append_images=[f.quantize(64) for f in frames[1:]], duration=50)
    webp = save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    for name, data in (("gif", gif), ("webp", webp)):
        with Image.open(io.BytesIO(data)) as image:
            assert getattr(image, "n_frames", 1) == 3
        expected = pillow_rgb(data)
        for backend, array in decode_both(data).items():
            assert_close(array, expected, what=f"animated {name} {backend}")


def test_format_sniffing_ignores_the_extension(tmp_path):
    png = LOSSLESS["png-rgb"]
    path = tmp_path / "really-a-png.jpg"
    path.write_bytes(png)
    for backend in BACKENDS:
        assert np.array_equal(speciesclf.decode(path, backend=backend), RGB)
        assert np.array_equal(speciesclf.decode(str(path), backend=backend), RGB)
        assert np.array_equal(speciesclf.decode(bytearray(png), backend=backend), RGB)
        assert np.array_equal(speciesclf.decode(memoryview(png), backend=backend), RGB)


def test_decode_rejects_non_bytes():
    for backend in BACKENDS:
        with pytest.raises(TypeError):
            speciesclf.decode(RGB, backend=backend)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            speciesclf.decode(12, backend=backend)  # type: ignore[arg-type]


# --- EXIF orientation ----------------------------------------------------------------------------------

# What ImageOps.exif_transpose applies for each orientation; its inverse stores an upright image rotated.
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # orientation whose transpose undoes this one's


def stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores so that orientation `orientation` displays `upright`."""
    if orientation == 1:
        return upright.copy()
    return upright.transpose(TRANSPOSE[INVERSE[orientation]])


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_stored_for_is_undone_by_exif_transpose():
    upright = Image.fromarray(content())
    for n in range(1, 9):
        data = save(stored_for(upright, n), "PNG", exif=exif_with(n))
        assert np.array_equal(pillow_rgb(data, transpose=True), np.asarray(upright)), n


ORIENTED_FORMATS = {
    "JPEG": dict(quality=100, subsampling=0),
    "PNG": {},
    "WEBP": dict(lossless=True),
}


@pytest.mark.parametrize("fmt", sorted(ORIENTED_FORMATS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(fmt, orientation):
    upright = Image.fromarray(content(40, 64))
    data = save(stored_for(upright, orientation), fmt, exif=exif_with(orientation), **ORIENTED_FORMATS[fmt])
    assert _formats.sniff_format(data) == fmt
    assert _formats.exif_orientation(data, fmt) == orientation
    expected = pillow_rgb(data, transpose=True)
    assert expected.shape == (40, 64, 3)
    for backend, array in decode_both(data).items():
        assert_close(array, expected, what=f"{fmt} orientation {orientation} {backend}")
    if fmt != "JPEG":
        assert np.array_equal(expected, np.asarray(upright))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_preprocess(orientation):
    """A rotated file preprocesses like the upright image: the backends within 1/255, both near upright."""
    upright_pixels = content(120, 200, seed=orientation)
    upright = Image.fromarray(upright_pixels)
    data = save(stored_for(upright, orientation), "JPEG", exif=exif_with(orientation), quality=100, subsampling=0)
    spec = PreprocessSpec(size=96, resize=110)
    outs = {b: preprocess_batch([data], spec, backend=b).array[0] for b in BACKENDS}
    pixels = {b: to_pixels(o).astype(np.int16) for b, o in outs.items()}
    assert np.abs(pixels["native"] - pixels["python"]).max() <= 1
    # The upright decode run through the same pipeline is what the rotated file gives.
    decoded = speciesclf.decode(data, backend="python")
    assert decoded.shape == (120, 200, 3)
    same = to_pixels(preprocess_batch([decoded], spec, backend="python").array[0]).astype(np.int16)
    assert np.array_equal(pixels["python"], same)
    # And it is the upright image up to JPEG's loss at quality 100 (the wrong way up would be far off).
    truth = to_pixels(preprocess_batch([upright_pixels], spec, backend="python").array[0]).astype(np.int16)
    for backend, p in pixels.items():
        diff = np.abs(p - truth)
        assert diff.mean() <= 1.5 and diff.max() <= 12, (backend, diff.mean(), diff.max())


@pytest.fixture(scope="module")
def large_photo_like() -> Image.Image:
    """A 2400x1800 image with fine detail (so a reduced-size decode is visible)."""
    small = content(90, 120, seed=3)
    big = Image.fromarray(small).resize((2400, 1800), Image.BICUBIC)
    noise = np.random.default_rng(4).integers(-12, 13, (1800, 2400, 3))
    return Image.fromarray(np.clip(np.asarray(big).astype(np.int16) + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("orientation", [6, 1, 3, 8, 5])
def test_large_jpeg_orientation_with_reduced_decode(orientation, large_photo_like):
    """Reduced-size DCT decode (1/4 here) combined with a rotation: the backends within 1/255.

    Orientation 1 is the case where the native core may also decode only the region the crop needs.
    """
    data = save(large_photo_like, "JPEG", exif=exif_with(orientation), quality=92)
    for spec in (PreprocessSpec(), PreprocessSpec(resize=None), PreprocessSpec(dtype="uint8", layout="NHWC")):
        outs = [to_pixels(preprocess_batch([data], spec, backend=b).array[0], layout=spec.layout) for b in BACKENDS]
        diff = np.abs(outs[0].astype(np.int16) - outs[1])
        assert diff.max() <= 1, (orientation, spec, diff.max())
    # decode() with min_size takes the same reduced decode on both paths.
    upright = (1800, 2400) if orientation >= 5 else (2400, 1800)
    decoded = decode_both(data, min_size=(300, 400))
    for backend, array in decoded.items():
        assert array.shape[1] >= 300 and array.shape[0] >= 400, backend
        assert array.shape[1] < upright[0] and array.shape[0] < upright[1], f"{backend}: no reduced decode"
        assert array.shape[1] * 4 >= upright[0] and array.shape[0] * 4 >= upright[1], backend
    assert_close(decoded["native"], decoded["python"], max_diff=2, mean_diff=0.1, what="reduced decode")
    full = pillow_rgb(data, transpose=True)
    assert full.shape == (upright[1], upright[0], 3)


def textured(width: int, height: int, seed: int) -> Image.Image:
    """Detail at every scale: a smooth field upscaled, plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8))


JPEG_GEOMETRIES = {
    "panorama-1to33": ((4000, 120), dict(quality=90)),
    "tall-1to33": ((120, 4000), dict(quality=90)),
    "odd-progressive": ((2401, 1799), dict(quality=90, progressive=True)),
    "odd-422": ((1537, 1023), dict(quality=90, subsampling=1)),
    "odd-444": ((2999, 777), dict(quality=90, subsampling=0)),
    "gray-wide": ((5000, 333), dict(quality=90, gray=True)),
}


@pytest.mark.parametrize("name", sorted(JPEG_GEOMETRIES))
def test_jpeg_geometries_backends_agree(name):
    """Large JPEGs of awkward shapes, where the native core decodes at reduced size and, when the crop
    keeps only part of the image, only the region it needs: the backends stay within 1/255."""
    (width, height), options = JPEG_GEOMETRIES[name]
    options = dict(options)
    image = textured(width, height, seed=width + height)
    if options.pop("gray", False):
        image = image.convert("L")
    data = save(image, "JPEG", **options)
    specs = [
        PreprocessSpec(),
        PreprocessSpec(jpeg_reduce_margin=None),
        PreprocessSpec(jpeg_reduce_margin=1.0, dtype="uint8", layout="NHWC"),
        PreprocessSpec(size=64, resize=400),  # a small crop out of a large resize
        PreprocessSpec(resize=None, size=128),  # the squash needs every pixel
    ]
    for spec in specs:
        outs = [to_pixels(preprocess_batch([data], spec, backend=b).array[0], layout=spec.layout) for b in BACKENDS]
        diff = np.abs(outs[0].astype(np.int16) - outs[1])
        assert diff.max() <= 1, f"{name} {spec}: native vs python differ by {diff.max()}/255"
        assert diff.mean() <= 0.5, f"{name} {spec}: mean difference {diff.mean():.3f}/255"


def test_png_exif_chunk_orientation():
    upright = Image.fromarray(content(30, 50))
    for n in (3, 6, 8):
        data = save(stored_for(upright, n), "PNG", exif=exif_with(n))
        assert b"eXIf" in data
        assert _formats.exif_orientation(data, "PNG") == n
        for backend, array in decode_both(data).items():
            assert np.array_equal(array, np.asarray(upright)), (n, backend)


# --- malformed EXIF: orientation 1, image decoded as stored --------------------------------------------

def tiff_blob(order: str = "MM", entries=((0x0112, 3, 1, 6),), ifd_offset: int = 8, count: int | None = None) -> bytes:
    """A TIFF header plus one IFD: (tag, type, count, value) entries, value in the 4-byte field."""
    fmt = ">" if order == "MM" else "<"
    blob = order.encode() + struct.pack(fmt + "HI", 42, ifd_offset)
    blob += struct.pack(fmt + "H", len(entries) if count is None else count)
    for tag, kind, n, value in entries:
        if kind == 3:
            field = struct.pack(fmt + "HH", value, 0)
        else:
            field = struct.pack(fmt + "I", value)
        blob += struct.pack(fmt + "HHI", tag, kind, n) + field
    return blob + struct.pack(fmt + "I", 0)


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Insert an APP1 segment (payload after the length) right after SOI."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def with_png_chunk(png: bytes, kind: bytes, payload: bytes) -> bytes:
    """Insert a chunk right after IHDR."""
    (length,) = struct.unpack(">I", png[8:12])
    cut = 8 + 12 + length
    return png[:cut] + png_chunk(kind, payload) + png[cut:]


VALID = tiff_blob()
MALFORMED_EXIF = {
    "truncated-ifd": VALID[:14],
    "truncated-entry": VALID[:18],
    "header-only": VALID[:8],
    "too-short": b"MM\x00*",
    "empty": b"",
    "bad-byte-order": b"XY" + VALID[2:],
    "mixed-byte-order": b"IM" + VALID[2:],
    "bad-magic": VALID[:2] + b"\x00\x2b" + VALID[4:],
    "huge-count": tiff_blob(entries=((0x010F, 2, 4, 0x41424300),), count=0xFFFF),
    "huge-count-little-endian": tiff_blob("II", entries=((0x0110, 2, 4, 0x41424300),), count=0xFFFF),
    # A SHORT with count > 2 does not fit the 4-byte field, which then holds an offset, not the value:
    # Pillow skips the tag ("Tag data larger than file") and exif_transpose leaves the image as stored.
    "orientation-entry-huge-count": tiff_blob(entries=((0x0112, 3, 0xFFFFFFFF, 6),)),
    "ifd-offset-past-end": tiff_blob(ifd_offset=0xFFFFFFF0),
    "ifd-offset-at-end": tiff_blob(ifd_offset=len(VALID)),
    "ifd-offset-one-before-end": tiff_blob(ifd_offset=len(VALID) - 1),
    "ifd-offset-wraps": tiff_blob(ifd_offset=0xFFFFFFFF),
    "orientation-zero": tiff_blob(entries=((0x0112, 3, 1, 0),)),
    "orientation-nine": tiff_blob(entries=((0x0112, 3, 1, 9),)),
    "orientation-huge-long": tiff_blob(entries=((0x0112, 4, 1, 0x10000006),)),
    "orientation-rational": tiff_blob(entries=((0x0112, 5, 1, 0xFFFFFF00),)),
    "orientation-ascii": tiff_blob(entries=((0x0112, 2, 4, 0x36000000),)),
    "only-other-tags": tiff_blob(entries=((0x010F, 2, 4, 0x41424300), (0x0110, 2, 4, 0x41424300))),
    "random-garbage": bytes(np.random.default_rng(9).integers(0, 256, 200, dtype=np.uint8)),
}


def test_valid_exif_helpers():
    """The blob builder itself: a valid blob reads as orientation 6 (big- and little-endian, SHORT and LONG)."""
    jpeg = save(Image.fromarray(content()), "JPEG", quality=95)
    for blob in (VALID, tiff_blob("II"), tiff_blob(entries=((0x0112, 4, 1, 6),)), tiff_blob("II", entries=((0x010F, 2, 4, 0), (0x0112, 4, 1, 6)))):
        data = with_app1(jpeg, b"Exif\x00\x00" + blob)
        assert _formats.exif_orientation(data, "JPEG") == 6
        expected = pillow_rgb(data, transpose=True)
        assert expected.shape == (W, H, 3)
        for backend, array in decode_both(data).items():
            assert_close(array, expected, what=backend)


@pytest.mark.parametrize("name", sorted(MALFORMED_EXIF))
@pytest.mark.parametrize("container", ["JPEG", "PNG", "WEBP"])
def test_malformed_exif_reads_as_upright(name, container):
    blob = MALFORMED_EXIF[name]
    if container == "JPEG":
        base = save(Image.fromarray(content()), "JPEG", quality=95)
        data = with_app1(base, b"Exif\x00\x00" + blob)
    elif container == "PNG":
        base = save(Image.fromarray(content()), "PNG")
        data = with_png_chunk(base, b"eXIf", blob)
    else:
        base = save(Image.fromarray(content()), "WEBP", lossless=True)
        data = webp_with_exif(base, blob)
    assert _formats.exif_orientation(data, container) == 1
    expected = pillow_rgb(base)
    spec = PreprocessSpec(size=32, resize=40)
    for backend, array in decode_both(data).items():
        assert_close(array, expected, what=f"{name} in {container} {backend}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PILLOW_WARNINGS, category=UserWarning)
            batch = preprocess_batch([data, base], spec, backend=backend)
        assert batch.all_ok
        assert np.array_equal(batch.array[0], batch.array[1]), f"{name} in {container} {backend}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_exif_leaks_no_warning(backend):
    """Malformed EXIF in a camera-style JPEG (APP1 first, no JFIF) is read as upright *silently*.

    A warning escaping decode() or preprocess_batch() becomes an exception under warnings-as-errors (this
    project's pytest configuration) that is no ImageError, so on_error="skip" cannot contain it.
    """
    base = save(Image.fromarray(content()), "JPEG", quality=95)
    leaked = {}
    for name, blob in sorted(MALFORMED_EXIF.items()):
        data = with_app1(base, b"Exif\x00\x00" + blob)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            speciesclf.decode(data, backend=backend)
            preprocess_batch([data], PreprocessSpec(size=16, resize=None), backend=backend, on_error="skip")
        if caught:
            leaked[name] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    assert not leaked, f"warnings leaked for {len(leaked)} malformed EXIF blobs: {leaked}"


def webp_with_exif(webp: bytes, payload: bytes) -> bytes:
    """A lossless WebP rewritten as extended (VP8X) with an EXIF chunk after the image data."""
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP" and webp[12:16] == b"VP8L"
    with Image.open(io.BytesIO(webp)) as image:
        width, height = image.size
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0])  # flags: EXIF present
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    exif = b"EXIF" + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")
    body = b"WEBP" + vp8x + webp[12:] + exif
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_webp_with_exif_helper():
    base = save(Image.fromarray(content()), "WEBP", lossless=True)
    data = webp_with_exif(base, VALID)
    assert _formats.exif_orientation(data, "WEBP") == 6
    expected = np.asarray(Image.fromarray(content()).transpose(Image.Transpose.ROTATE_270))
    for backend, array in decode_both(data).items():
        assert_close(array, expected, what=backend)


@pytest.mark.parametrize("name", sorted(MALFORMED_EXIF))
def test_exif_orientation_never_raises_on_raw_blobs(name):
    blob = MALFORMED_EXIF[name]
    for prefix in (b"", b"Exif\x00\x00"):
        assert _formats._tiff_orientation(prefix + blob) == 1


def test_exif_segment_structure_problems():
    """Broken JPEG marker structure before the image data: orientation 1, and the image still decodes."""
    base = save(Image.fromarray(content()), "JPEG", quality=95)
    variants = {
        "exif-after-sos-is-ignored": base[:-2] + b"\xff\xe1\x00\x10Exif\x00\x00" + VALID[:8] + base[-2:],
        "app1-without-exif-id": with_app1(base, b"XMP\x00" + VALID),
        "short-app1": with_app1(base, b"Exif"),
        "two-exif-first-wins": with_app1(with_app1(base, b"Exif\x00\x00" + tiff_blob(entries=((0x0112, 3, 1, 3),))), b"Exif\x00\x00" + tiff_blob(entries=((0x0112, 3, 1, 1),))),
    }
    assert _formats.exif_orientation(variants["two-exif-first-wins"], "JPEG") == 1
    for name, data in variants.items():
        assert _formats.exif_orientation(data, "JPEG") == 1, name
        expected = pillow_rgb(base)
        for backend, array in decode_both(data).items():
            assert_close(array, expected, what=f"{name} {backend}")
