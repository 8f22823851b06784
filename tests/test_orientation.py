"""Orientation carried by PNG text and XMP chunks, JPEG and WebP XMP, and hostile metadata chunks.

Pillow's ``ImageOps.exif_transpose`` is the oracle: it reads a PNG's eXIf chunk, else its "Raw profile type
exif" text chunk (hex, as ImageMagick writes it in tEXt, zTXt or iTXt), and, when neither holds an
orientation tag, the ``tiff:Orientation`` of the XMP packet (iTXt "XML:com.adobe.xmp"); JPEG and WebP
files carry XMP too. Both backends must give exactly what it gives (PNG and lossless WebP are exact), and
so each other; hostile chunks must neither fail the image nor cost time.
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from speciesclf import PreprocessSpec, preprocess_batch
from speciesclf.preprocessing import _formats
from test_formats import (
    BACKENDS,
    assert_close,
    content,
    decode_both,
    exif_with,
    png_chunk,
    save,
    stored_for,
    tiff_blob,
    webp_with_exif,
)

UPRIGHT = Image.fromarray(content(30, 44, seed=5))
RAW_PROFILE = b"Raw profile type exif"
XMP_KEY = b"XML:com.adobe.xmp"


def oracle(data: bytes) -> np.ndarray:
    """What Pillow shows: the image made upright by ImageOps.exif_transpose."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def tiff_with(orientation: int | None) -> bytes:
    """An EXIF TIFF block: with an orientation tag, or (None) only a Make tag."""
    if orientation is None:
        return tiff_blob(entries=((0x010F, 2, 4, 0x41424300),))
    return tiff_blob(entries=((0x010F, 2, 4, 0x41424300), (0x0112, 3, 1, orientation)))


def raw_profile_text(exif: bytes) -> bytes:
    """ImageMagick's "Raw profile type exif" text: a blank line, the name, the length, 72 hex digits a line."""
    digits = exif.hex().encode()
    lines = [digits[i : i + 72] for i in range(0, len(digits), 72)]
    return b"\nexif\n" + b"%8d\n" % len(exif) + b"\n".join(lines) + b"\n"


def xmp_packet(orientation: int, form: str = "attribute") -> bytes:
    if form == "attribute":
        description = f'<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
    else:
        description = (
            '<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/">'
            f"<tiff:Orientation>{orientation}</tiff:Orientation></rdf:Description>"
        )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'{description}</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def text_chunk(kind: str, keyword: bytes, text: bytes) -> tuple[bytes, bytes]:
    """A tEXt, zTXt or iTXt chunk (iTXt plain, or "iTXt-z" compressed) holding `text` under `keyword`."""
    if kind == "tEXt":
        return b"tEXt", keyword + b"\0" + text
    if kind == "zTXt":
        return b"zTXt", keyword + b"\0\0" + zlib.compress(text)
    if kind == "iTXt":
        return b"iTXt", keyword + b"\0\0\0" + b"\0" + b"\0" + text
    assert kind == "iTXt-z"
    return b"iTXt", keyword + b"\0\1\0" + b"\0" + b"\0" + zlib.compress(text)


def png_with(image: Image.Image, chunks, after_idat=()) -> bytes:
    """A PNG of `image` with extra (type, payload) chunks after IHDR and, optionally, after the image data."""
    data = save(image, "PNG")
    (length,) = struct.unpack(">I", data[8:12])
    cut = 8 + 12 + length
    end = data.rindex(b"IEND") - 4
    before = b"".join(png_chunk(kind, payload) for kind, payload in chunks)
    after = b"".join(png_chunk(kind, payload) for kind, payload in after_idat)
    return data[:cut] + before + data[cut:end] + after + data[end:]


def exif_chunk(orientation: int | None) -> tuple[bytes, bytes]:
    return b"eXIf", tiff_with(orientation)


def raw_profile_chunk(orientation: int | None, kind: str = "zTXt", prefix: bool = True) -> tuple[bytes, bytes]:
    exif = (b"Exif\0\0" if prefix else b"") + tiff_with(orientation)
    return text_chunk(kind, RAW_PROFILE, raw_profile_text(exif))


def xmp_chunk(orientation: int, kind: str = "iTXt", form: str = "attribute") -> tuple[bytes, bytes]:
    return text_chunk(kind, XMP_KEY, xmp_packet(orientation, form))


def assert_backends_show(data: bytes, expected: np.ndarray, what: str) -> None:
    for backend, array in decode_both(data).items():
        assert array.shape == expected.shape, f"{what} {backend}: shape {array.shape} != {expected.shape}"
        assert np.array_equal(array, expected), f"{what} {backend}: pixels differ"


# --- every carrier, every orientation -------------------------------------------------------------------

PNG_CARRIERS = {
    "eXIf": lambda n: exif_chunk(n),
    "raw-profile-tEXt": lambda n: raw_profile_chunk(n, "tEXt"),
    "raw-profile-zTXt": lambda n: raw_profile_chunk(n, "zTXt"),
    "raw-profile-iTXt": lambda n: raw_profile_chunk(n, "iTXt"),
    "raw-profile-iTXt-compressed": lambda n: raw_profile_chunk(n, "iTXt-z"),
    "raw-profile-without-exif-prefix": lambda n: raw_profile_chunk(n, "zTXt", prefix=False),
    "xmp-attribute": lambda n: xmp_chunk(n),
    "xmp-element": lambda n: xmp_chunk(n, form="element"),
    "xmp-compressed-iTXt": lambda n: xmp_chunk(n, "iTXt-z"),
    "xmp-tEXt": lambda n: xmp_chunk(n, "tEXt"),
    "xmp-zTXt": lambda n: xmp_chunk(n, "zTXt"),
}


@pytest.mark.parametrize("where", ["before-idat", "after-idat"])
@pytest.mark.parametrize("carrier", sorted(PNG_CARRIERS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_orientation_carriers(carrier, orientation, where):
    chunk = PNG_CARRIERS[carrier](orientation)
    stored = stored_for(UPRIGHT, orientation)
    data = png_with(stored, [chunk]) if where == "before-idat" else png_with(stored, [], [chunk])
    expected = oracle(data)
    assert np.array_equal(expected, np.asarray(UPRIGHT)), "the test file does not carry its orientation for Pillow"
    assert _formats.exif_orientation(data, "PNG") == orientation
    assert_backends_show(data, expected, f"{carrier} {orientation} {where}")


@pytest.mark.parametrize("carrier", ["raw-profile-zTXt", "xmp-attribute", "eXIf"])
def test_png_orientation_preprocess_backends_bit_identical(carrier):
    stored = stored_for(UPRIGHT, 6)
    data = png_with(stored, [PNG_CARRIERS[carrier](6)])
    for spec in (PreprocessSpec(size=24, resize=28), PreprocessSpec(size=16, resize=None, dtype="uint8", layout="NHWC")):
        outs = {b: preprocess_batch([data, np.asarray(UPRIGHT)], spec, backend=b).array for b in BACKENDS}
        assert np.array_equal(outs["native"], outs["python"]), (carrier, spec)
        assert np.array_equal(outs["python"][0], outs["python"][1]), (carrier, spec)  # the file came out upright


# --- precedence: what Pillow does with several carriers -------------------------------------------------

PRECEDENCE = {
    # name: (chunks before IDAT, chunks after IDAT, the orientation Pillow applies)
    "exif-over-raw-profile-and-xmp": ([exif_chunk(3), raw_profile_chunk(6), xmp_chunk(8)], [], 3),
    "raw-profile-over-xmp": ([raw_profile_chunk(6), xmp_chunk(8)], [], 6),
    "exif-without-tag-then-xmp": ([exif_chunk(None), xmp_chunk(8)], [], 8),
    "exif-without-tag-hides-raw-profile": ([exif_chunk(None), raw_profile_chunk(6)], [], 1),
    "raw-profile-without-tag-then-xmp": ([raw_profile_chunk(None), xmp_chunk(5)], [], 5),
    "exif-upright-over-xmp": ([exif_chunk(1), xmp_chunk(6)], [], 1),
    "last-exif-wins": ([exif_chunk(3), exif_chunk(6)], [], 6),
    "last-raw-profile-wins": ([raw_profile_chunk(3, "tEXt"), raw_profile_chunk(6, "zTXt")], [], 6),
    "last-xmp-wins": ([xmp_chunk(3), xmp_chunk(7, "tEXt")], [], 7),
    "exif-after-idat-over-raw-profile-before": ([raw_profile_chunk(6)], [exif_chunk(3)], 3),
    "raw-profile-after-idat-replaces-earlier": ([raw_profile_chunk(6)], [raw_profile_chunk(8, "iTXt")], 8),
    "first-xmp-tag-in-a-packet": ([(b"iTXt", XMP_KEY + b"\0\0\0\0\0" + xmp_packet(5) + xmp_packet(2))], [], 5),
    "xmp-needs-quote-or-bracket": ([(b"iTXt", XMP_KEY + b"\0\0\0\0\0tiff:Orientation=6 tiff:Orientation='7' " + xmp_packet(4))], [], 4),
    "xmp-orientation-out-of-range": ([xmp_chunk(9), raw_profile_chunk(None)], [], 1),
    "other-keywords-ignored": ([text_chunk("zTXt", b"Raw profile type iptc", raw_profile_text(tiff_with(6))), text_chunk("iTXt", b"XMP", xmp_packet(6))], [], 1),
}


@pytest.mark.parametrize("name", sorted(PRECEDENCE))
def test_png_orientation_precedence_matches_pillow(name):
    before, after, orientation = PRECEDENCE[name]
    data = png_with(stored_for(UPRIGHT, orientation), before, after)
    expected = oracle(data)
    assert np.array_equal(expected, np.asarray(UPRIGHT)), f"{name}: Pillow applies another orientation"
    assert _formats.exif_orientation(data, "PNG") == orientation
    assert_backends_show(data, expected, name)


# --- hostile chunks: the image decodes, as stored unless a readable carrier remains, and quickly ------

def bomb(text: bytes, total: int) -> bytes:
    """`text` padded with spaces to `total` bytes: it compresses a thousandfold."""
    return text + b" " * (total - len(text))


HOSTILE = {
    # name: (chunks, the orientation the backends apply). The budget: a text carrier that inflates past
    # 1 MiB (Pillow's PngImagePlugin.MAX_TEXT_CHUNK) is ignored, as is one whose text cannot be read.
    "raw-profile-inflating-past-budget": (lambda: [text_chunk("zTXt", RAW_PROFILE, bomb(raw_profile_text(tiff_with(6)), 8 << 20))], 1),
    "xmp-inflating-past-budget": (lambda: [text_chunk("iTXt-z", XMP_KEY, bomb(xmp_packet(6), 8 << 20))], 1),
    "raw-profile-inflating-past-budget-then-xmp": (lambda: [text_chunk("zTXt", RAW_PROFILE, bomb(raw_profile_text(tiff_with(3)), 8 << 20)), xmp_chunk(6)], 6),
    "comment-inflating-past-budget": (lambda: [text_chunk("zTXt", b"Comment", bomb(b"hello", 8 << 20))], 1),
    "raw-profile-bad-hex": (lambda: [text_chunk("tEXt", RAW_PROFILE, raw_profile_text(tiff_with(6)).replace(b"4d", b"zz"))], 1),
    "raw-profile-odd-digits": (lambda: [text_chunk("tEXt", RAW_PROFILE, raw_profile_text(tiff_with(6))[:-2] + b"\n")], 1),
    "raw-profile-bad-hex-then-xmp": (lambda: [text_chunk("tEXt", RAW_PROFILE, b"\nexif\n 9\nnot hex\n"), xmp_chunk(8)], 8),
    "raw-profile-too-few-lines": (lambda: [text_chunk("tEXt", RAW_PROFILE, b"\nexif\n" + tiff_with(6).hex().encode())], 1),
    "raw-profile-truncated-zlib": (lambda: [(b"zTXt", RAW_PROFILE + b"\0\0" + zlib.compress(raw_profile_text(tiff_with(6)))[:20])], 1),
    "raw-profile-corrupt-zlib": (lambda: [(b"zTXt", RAW_PROFILE + b"\0\0" + b"\x78\x9c" + b"\xff" * 40)], 1),
    "ztxt-unknown-method": (lambda: [(b"zTXt", RAW_PROFILE + b"\0\1" + zlib.compress(raw_profile_text(tiff_with(6))))], 1),
    "itxt-unknown-method": (lambda: [(b"iTXt", XMP_KEY + b"\0\1\1\0\0" + zlib.compress(xmp_packet(6)))], 1),
    "itxt-truncated-header": (lambda: [(b"iTXt", XMP_KEY + b"\0\0")], 1),
    "keyword-without-separator": (lambda: [(b"tEXt", RAW_PROFILE), (b"zTXt", XMP_KEY), (b"iTXt", XMP_KEY)], 1),
    "empty-chunks": (lambda: [(b"tEXt", b""), (b"zTXt", b""), (b"iTXt", b""), (b"eXIf", b"")], 1),
    "raw-profile-garbage-tiff": (lambda: [text_chunk("tEXt", RAW_PROFILE, raw_profile_text(b"Exif\0\0II*\0\xff\xff\xff\xff"))], 1),
    "xmp-deeply-nested": (lambda: [text_chunk("iTXt", XMP_KEY, b"<a>" * 300_000 + b'tiff:Orientation="6"' + b"</a>" * 300_000)], 6),
    "xmp-many-near-misses": (lambda: [text_chunk("iTXt", XMP_KEY, b"tiff:Orientation=" * 400_000 + b"tiff:Orientation>7")], 7),
    "xmp-huge-uncompressed": (lambda: [text_chunk("tEXt", XMP_KEY, b" " * (24 << 20) + xmp_packet(5))], 5),
    "many-text-chunks": (lambda: [raw_profile_chunk(3)] * 3000 + [xmp_chunk(6)] * 3000, 3),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_png_chunks_cost_neither_the_image_nor_time(name):
    chunks, orientation = HOSTILE[name]
    data = png_with(stored_for(UPRIGHT, orientation), chunks())
    started = time.perf_counter()
    assert _formats.exif_orientation(data, "PNG") == orientation
    assert_backends_show(data, np.asarray(UPRIGHT), name)
    batch = preprocess_batch([data], PreprocessSpec(size=16, resize=20), backend="native")
    assert batch.all_ok
    elapsed = time.perf_counter() - started
    # A linear pass over at most ~25 MB of metadata, three times, and at most 1 MiB inflated per carrier.
    assert elapsed < 5.0, f"{name}: {elapsed:.2f} s"


# --- JPEG and WebP: XMP, and WebP's metadata flags ------------------------------------------------------

def jpeg_with_xmp(image: Image.Image, xmp: bytes, exif: Image.Exif | None = None) -> bytes:
    options = dict(quality=100, subsampling=0, xmp=xmp)
    if exif is not None:
        options["exif"] = exif
    return save(image, "JPEG", **options)


@pytest.mark.parametrize("form", ["attribute", "element"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_xmp_orientation(orientation, form):
    data = jpeg_with_xmp(stored_for(UPRIGHT, orientation), xmp_packet(orientation, form))
    expected = oracle(data)
    assert expected.shape[:2] == (30, 44)
    assert _formats.exif_orientation(data, "JPEG") == orientation
    for backend, array in decode_both(data).items():
        assert_close(array, expected, what=f"JPEG XMP {orientation} {backend}")


def test_jpeg_exif_orientation_over_xmp():
    for exif, xmp, applied in ((exif_with(1), 6, 1), (exif_with(3), 6, 3), (Image.Exif(), 6, 6)):
        data = jpeg_with_xmp(stored_for(UPRIGHT, applied), xmp_packet(xmp), exif)
        expected = oracle(data)
        assert expected.shape[:2] == (30, 44)
        assert _formats.exif_orientation(data, "JPEG") == applied
        for backend, array in decode_both(data).items():
            assert_close(array, expected, what=f"JPEG EXIF {applied} XMP {xmp} {backend}")


@pytest.mark.parametrize("form", ["attribute", "element"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_webp_xmp_orientation(orientation, form):
    data = save(stored_for(UPRIGHT, orientation), "WEBP", lossless=True, xmp=xmp_packet(orientation, form))
    expected = oracle(data)
    assert np.array_equal(expected, np.asarray(UPRIGHT))
    assert _formats.exif_orientation(data, "WEBP") == orientation
    assert_backends_show(data, expected, f"WebP XMP {orientation}")


def test_webp_exif_over_xmp():
    data = save(stored_for(UPRIGHT, 3), "WEBP", lossless=True, exif=exif_with(3), xmp=xmp_packet(6))
    assert np.array_equal(oracle(data), np.asarray(UPRIGHT))
    assert _formats.exif_orientation(data, "WEBP") == 3
    assert_backends_show(data, np.asarray(UPRIGHT), "WebP EXIF over XMP")


def test_webp_metadata_only_where_the_header_declares_it():
    """libwebp (so Pillow) reads an EXIF chunk only in an extended file whose VP8X flags declare it."""
    simple = save(UPRIGHT, "WEBP", lossless=True)
    flagged = webp_with_exif(simple, tiff_with(6))
    flags_at = flagged.index(b"VP8X") + 8
    unflagged = flagged[:flags_at] + b"\0" + flagged[flags_at + 1 :]
    exif = b"EXIF" + struct.pack("<I", len(tiff_with(6))) + tiff_with(6)
    body = simple[8:] + exif
    trailing = b"RIFF" + struct.pack("<I", len(body)) + body
    for name, data in {"flag-cleared": unflagged, "simple-format": trailing}.items():
        assert np.array_equal(oracle(data), np.asarray(UPRIGHT)), name
        assert _formats.exif_orientation(data, "WEBP") == 1, name
        assert_backends_show(data, np.asarray(UPRIGHT), name)
    # and a chunk past the RIFF size is no part of the file
    riff_size = struct.unpack("<I", flagged[4:8])[0]
    outside = flagged[:8] + struct.pack("<I", riff_size - len(exif)) + flagged[8:]
    assert _formats.exif_orientation(outside, "WEBP") == 1
