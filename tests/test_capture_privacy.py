"""capture.privacy: metadata stripped from stored images (pixels identical, orientation recorded) and locations
coarsened to a grid.

The privacy corpus is built here: Pillow writes EXIF (with a GPS block and a MakerNote), ICC profiles, WebP
EXIF/XMP and PNG text; the rest (XMP with drone-style GPS, IPTC, vendor APPn, COM, tIME, trailers) is put in
by hand. Each stripped file is parsed (no metadata segment or chunk left) and scanned byte by byte.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms

from speciesclf.capture.privacy import StrippedImage, coarsen_location, strip_metadata
from speciesclf.errors import DecodeError, EmptyInputError, ImageError, UnsupportedFormatError
from speciesclf.preprocessing import _formats

# What no stored file may hold, as bytes: the metadata carriers' signatures and every string put in below.
SECRETS = (b"Exif", b"http://ns.adobe.com/xap", b"GPS", b"Photoshop 3.0", b"TESTCAM", b"SECRET")
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
# Past one APP2 segment's 65519 bytes, so Pillow writes it in three ICC_PROFILE chunks (it checks no ICC).
BIG_ICC = ICC + bytes(range(256)) * 600
XMP_GPS = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
           b' exif:GPSLatitude="51,30.2073N" exif:GPSLongitude="0,7.4783W" tiff:Orientation="3"'
           b' drone-dji:SerialNumber="SECRET-DRONE-SERIAL"/></rdf:RDF></x:xmpmeta>')
XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"


def content(height: int = 29, width: int = 41) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 6 % 256, y * 9 % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    image[:5, :5] = (250, 10, 10)
    return image


def exif(orientation: int | None = 6) -> Image.Exif:
    tags = Image.Exif()
    if orientation is not None:
        tags[0x0112] = orientation
    tags[0x010F] = "TESTCAM maker"
    tags[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (51.0, 30.0, 12.5),
                                  ExifTags.GPS.GPSLongitudeRef: "W", ExifTags.GPS.GPSLongitude: (0.0, 7.0, 28.7)}
    tags[ExifTags.IFD.Exif] = {0x927C: b"TESTCAM-MAKERNOTE-SERIAL-4711", 0xA431: "TESTCAM-BODY-SERIAL"}
    return tags


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def decoded(data: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.mode, np.asarray(image)


# --- hand-built carriers -------------------------------------------------------------------------------------------

def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def iptc() -> bytes:
    record = b"\x1c\x02\x78" + struct.pack(">H", 27) + b"SECRET-IPTC-CAPTION-ALICE-B"
    resource = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(record)) + record + b"\x00" * (len(record) & 1)
    return segment(0xED, b"Photoshop 3.0\x00" + resource)


def after_first_segment(jpeg: bytes, *segments: bytes) -> bytes:
    """``segments`` put in after the first segment following SOI (JFIF's APP0, where there is one)."""
    (length,) = struct.unpack_from(">H", jpeg, 4)
    return jpeg[: 4 + length] + b"".join(segments) + jpeg[4 + length :]


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def before_iend(png: bytes, *chunks: bytes) -> bytes:
    return png[:-12] + b"".join(chunks) + png[-12:]


def jpeg_markers(data: bytes) -> list[tuple[int, bytes]]:
    return [(marker, data[start + 4 : end]) for marker, start, end in _formats.jpeg_markers(data)]


def png_chunks(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    assert pos == len(data)
    return kinds


def webp_chunks(data: bytes) -> list[bytes]:
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    kinds, pos = [], 12
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos + 4)
        kinds.append(data[pos : pos + 4])
        pos += 8 + length + (length & 1)
    assert pos == len(data)
    return kinds


# --- the corpus ----------------------------------------------------------------------------------------------------

def jpeg_exif_gps() -> bytes:
    return encode(Image.fromarray(content()), "JPEG", quality=90, exif=exif(6), icc_profile=BIG_ICC)


def jpeg_everything() -> bytes:
    """EXIF GPS + MakerNote, XMP GPS, IPTC, vendor APPn (a MakerNote holder, JUMBF/C2PA), COM, a trailer."""
    base = encode(Image.fromarray(content()), "JPEG", quality=85, exif=exif(8), icc_profile=ICC,
                  comment=b"SECRET-PILLOW-COMMENT")
    return after_first_segment(
        base, segment(0xE1, XMP_ID + XMP_GPS), iptc(), segment(0xE4, b"TESTCAM\x00MakerNote SECRET-SERIAL-99"),
        segment(0xEB, b"JP\x00\x00jumb SECRET-C2PA-CLAIM"), segment(0xFE, b"SECRET-HAND-COMMENT"),
    ) + b"SECRET-TRAILER-after-EOI"


def jpeg_xmp_only() -> bytes:
    """A drone's file: the position and the orientation in XMP, no EXIF."""
    base = encode(Image.fromarray(content()), "JPEG", quality=92)
    return after_first_segment(base, segment(0xE1, XMP_ID + XMP_GPS))


def jpeg_cmyk_adobe() -> bytes:
    cmyk = Image.fromarray(np.concatenate([content(), content()[..., :1]], axis=-1), "CMYK")
    return after_first_segment(encode(cmyk, "JPEG", quality=90, exif=exif(2)), iptc())


def jpeg_progressive_app_between_scans() -> bytes:
    base = encode(Image.fromarray(content()), "JPEG", quality=80, progressive=True, exif=exif(5))
    second_scan = [start for marker, start, _ in _formats.jpeg_markers(base) if marker == 0xDA][1]
    extra = segment(0xFE, b"SECRET-BETWEEN-SCANS") + segment(0xE1, XMP_ID + XMP_GPS)
    return base[:second_scan] + extra + base[second_scan:]


def jpeg_gray_no_jfif() -> bytes:
    gray = encode(Image.fromarray(content()[..., 0], "L"), "JPEG", quality=95, exif=exif(3))
    (app0,) = struct.unpack_from(">H", gray, 4)
    return gray[:2] + gray[4 + app0 :]  # JFIF's APP0 gone: exif is now the first segment


def png_everything() -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "SECRET-TEXT")
    info.add_text("Author", "SECRET-AUTHOR-ZTXT", zip=True)
    info.add_itxt("XML:com.adobe.xmp", XMP_GPS.decode(), zip=False)
    png = encode(Image.fromarray(content()), "PNG", exif=exif(8), pnginfo=info, icc_profile=ICC)
    return before_iend(png, chunk(b"tIME", b"\x07\xe8\x05\x11\x0c\x22\x38"),
                       chunk(b"caBX", b"SECRET-C2PA-MANIFEST")) + b"SECRET-TRAILER-after-IEND"


def png_rgba_transparency() -> bytes:
    rgba = np.concatenate([content(), (content()[..., :1] // 2 + 7)], axis=-1)
    return encode(Image.fromarray(rgba, "RGBA"), "PNG", exif=exif(7))


def webp(lossless: bool) -> bytes:
    return encode(Image.fromarray(content()), "WEBP", lossless=lossless, quality=80, exif=exif(6),
                  xmp=XMP_GPS, icc_profile=ICC)


def webp_with_trailing_chunk() -> bytes:
    payload = b"SECRET-UNKNOWN-CHUNK"
    data = webp(True) + b"SECR" + struct.pack("<I", len(payload)) + payload
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]


CORPUS = {
    "jpeg exif gps + big icc": (jpeg_exif_gps, "jpeg", 6, BIG_ICC),
    "jpeg every carrier": (jpeg_everything, "jpeg", 8, ICC),
    "jpeg xmp gps only": (jpeg_xmp_only, "jpeg", 3, None),
    "jpeg cmyk adobe + iptc": (jpeg_cmyk_adobe, "jpeg", 2, None),
    "jpeg progressive, app between scans": (jpeg_progressive_app_between_scans, "jpeg", 5, None),
    "jpeg gray without jfif": (jpeg_gray_no_jfif, "jpeg", 3, None),
    "png exif + text + time + private": (png_everything, "png", 8, ICC),
    "png rgba": (png_rgba_transparency, "png", 7, None),
    "webp lossless exif + xmp": (lambda: webp(True), "webp", 6, ICC),
    "webp lossy exif + xmp": (lambda: webp(False), "webp", 6, ICC),
    "webp unknown chunk": (webp_with_trailing_chunk, "webp", 6, ICC),
}


def assert_no_metadata(data: bytes, fmt: str, secrets: tuple[bytes, ...] = SECRETS) -> None:
    if fmt == "jpeg":
        kept_app = {0xE0: b"JFIF\x00", 0xE2: b"ICC_PROFILE\x00", 0xEE: b"Adobe"}
        markers = jpeg_markers(data)
        assert markers[-1][0] == 0xD9 and data.endswith(b"\xff\xd9")
        for marker, payload in markers:
            assert marker != 0xFE, "COM left"
            if 0xE0 <= marker <= 0xEF:
                assert marker in kept_app and payload.startswith(kept_app[marker]), (hex(marker), payload[:20])
    elif fmt == "png":
        assert not {b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME", b"caBX"} & set(png_chunks(data))
    else:
        kinds = webp_chunks(data)
        assert b"EXIF" not in kinds and b"XMP " not in kinds
        if kinds[0] == b"VP8X":
            assert data[20] & 0x0C == 0
    for secret in secrets:
        assert secret not in data, secret
    with Image.open(io.BytesIO(data)) as image:
        assert not {"exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop", "Comment", "Author"} & set(image.info)
        assert len(image.getexif()) == 0


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_stripped_losslessly(name: str) -> None:
    make, fmt, orientation, icc = CORPUS[name]
    original = make()
    assert b"TESTCAM" in original or b"SECRET" in original, "the corpus file carries its metadata"
    result = strip_metadata(original)
    assert isinstance(result, StrippedImage) and result.format == fmt
    assert result.orientation == orientation
    assert result.removed and len(result.data) < len(original)
    assert_no_metadata(result.data, fmt)
    before_mode, before = decoded(original)
    after_mode, after = decoded(result.data)
    assert before_mode == after_mode and np.array_equal(before, after)
    assert (result.width, result.height) == (before.shape[1], before.shape[0])
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.info.get("icc_profile") == icc
    again = strip_metadata(result.data)
    assert again.data == result.data and again.removed == [] and again.orientation is None


def test_what_was_removed_is_named() -> None:
    removed = strip_metadata(jpeg_everything()).removed
    assert sorted(removed) == sorted(["APP1 Exif", "APP1 XMP", "APP13 IPTC", "APP4 TESTCAM", "APP11 JP", "COM", "COM",
                                      "data after EOI"])
    assert removed[-1] == "data after EOI"
    png = strip_metadata(png_everything()).removed
    assert {"PNG eXIf", "PNG tEXt", "PNG zTXt", "PNG iTXt", "PNG tIME", "PNG caBX", "data after IEND"} == set(png)
    assert strip_metadata(webp_with_trailing_chunk()).removed == ["WebP EXIF", "WebP XMP", "WebP SECR"]


def test_kept_jpeg_segments_and_scan_data_are_byte_for_byte() -> None:
    original = jpeg_everything()
    result = strip_metadata(original).data
    kept = [(m, p) for m, p in jpeg_markers(original) if not (0xE0 <= m <= 0xEF or m == 0xFE)
            or (m, p[:5]) in {(0xE0, b"JFIF\x00"), (0xE2, b"ICC_P")}]
    assert jpeg_markers(result) == kept
    scan = original.index(b"\xff\xda")
    assert result.endswith(original[scan : original.rindex(b"\xff\xd9") + 2])


def test_no_orientation_is_none_and_clean_files_pass_unchanged() -> None:
    plain = encode(Image.fromarray(content()), "JPEG", quality=90)
    result = strip_metadata(plain)
    assert result.data == plain and result.orientation is None and result.removed == []
    png = encode(Image.fromarray(content()), "PNG")
    assert strip_metadata(bytearray(png)).data == png


# --- formats re-encoded as PNG ---------------------------------------------------------------------------------------

def gif_transparent() -> bytes:
    image = Image.fromarray(content()).quantize(64)
    return encode(image, "GIF", transparency=3, comment=b"SECRET-GIF-COMMENT")


def tiff_exif() -> bytes:
    return encode(Image.fromarray(content()), "TIFF", exif=exif(6).tobytes(), icc_profile=ICC)


def tiff_cmyk() -> bytes:
    cmyk = Image.fromarray(np.concatenate([content(), content()[..., :1]], axis=-1), "CMYK")
    return encode(cmyk, "TIFF", exif=exif(None).tobytes())


REENCODED = {"gif": (gif_transparent, None), "bmp": (lambda: encode(Image.fromarray(content()), "BMP"), None),
             "tiff": (tiff_exif, 6), "tiff cmyk": (tiff_cmyk, None)}


@pytest.mark.parametrize("name", sorted(REENCODED))
def test_other_formats_become_png_with_identical_pixels(name: str) -> None:
    make, orientation = REENCODED[name]
    original = make()
    result = strip_metadata(original)
    assert result.format == "png" and result.orientation == orientation
    assert result.removed[0].endswith("re-encoded as PNG")
    assert_no_metadata(result.data, "png")
    with Image.open(io.BytesIO(original)) as before, Image.open(io.BytesIO(result.data)) as after:
        view = "RGB" if before.mode == "CMYK" else "RGBA"
        assert np.array_equal(np.asarray(before.convert(view)), np.asarray(after.convert(view)))
        assert after.mode == ("RGB" if before.mode == "CMYK" else before.mode)


# --- bad input ------------------------------------------------------------------------------------------------------

def test_empty_and_unknown_input_are_typed() -> None:
    with pytest.raises(EmptyInputError):
        strip_metadata(b"")
    with pytest.raises(UnsupportedFormatError):
        strip_metadata(b"<html>not an image</html>")


@pytest.mark.parametrize("name", ["jpeg exif gps + big icc", "png rgba", "webp lossy exif + xmp"])
def test_truncated_files_are_decode_errors(name: str) -> None:
    data = CORPUS[name][0]()
    for cut in sorted({20, 33, 100, len(data) // 2, len(data) - 3, len(data) - 1}):
        with pytest.raises(DecodeError):
            strip_metadata(data[:cut])


def test_damaged_structures_are_decode_errors() -> None:
    png = png_rgba_transparency()
    flipped = bytearray(png)
    flipped[40] ^= 0x55
    with pytest.raises(DecodeError, match="CRC"):
        strip_metadata(bytes(flipped))
    with pytest.raises(DecodeError, match="critical"):
        strip_metadata(before_iend(png, chunk(b"ZZZZ", b"x")))
    jpeg = jpeg_exif_gps()
    with pytest.raises(DecodeError):  # bytes that are not a marker where one must be
        strip_metadata(jpeg[:20] + b"junk" + jpeg[20:])
    with pytest.raises(DecodeError):  # a segment length past the end of the file
        strip_metadata(jpeg[:2] + b"\xff\xe1\xff\xff" + jpeg[2:100])
    with pytest.raises(DecodeError):
        strip_metadata(gif_transparent()[:30])


_SEEDS = [CORPUS[name][0]() for name in ("jpeg every carrier", "png exif + text + time + private",
                                          "webp lossless exif + xmp")] + [gif_transparent()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(_SEEDS))), edits=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
    min_size=1, max_size=6))
def test_fuzzed_input_is_a_typed_error_or_clean(seed: int, edits) -> None:
    data = bytearray(_SEEDS[seed])
    for where, value, how in edits:
        at = int(where * len(data))
        if how == "set":
            data[at] = value
        elif how == "insert":
            data[at:at] = bytes([value])
        else:
            del data[at]
    try:
        result = strip_metadata(bytes(data))
    except ImageError:
        return
    if result.format == "jpeg":
        assert not any(m == 0xFE or m in (0xE1, 0xED, 0xE4, 0xEB) for m, _ in jpeg_markers(result.data))
    elif result.format == "png":
        assert not {b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"} & set(png_chunks(result.data))
    else:
        assert not {b"EXIF", b"XMP "} & set(webp_chunks(result.data))


# --- the shared photos ------------------------------------------------------------------------------------------------

def test_sample_photos_keep_their_pixels(photo_bytes: list[bytes]) -> None:
    for data in photo_bytes:
        result = strip_metadata(data)
        assert result.format == "jpeg"
        # Three-byte strings turn up in a photo's compressed data by chance: only the carriers' signatures here.
        assert_no_metadata(result.data, "jpeg", secrets=(b"Exif\x00\x00", b"http://ns.adobe.com/xap", b"8BIM"))
        before_mode, before = decoded(data)
        after_mode, after = decoded(result.data)
        assert before_mode == after_mode and np.array_equal(before, after)
        assert (result.width, result.height) == (before.shape[1], before.shape[0])


# --- location ---------------------------------------------------------------------------------------------------------

def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    (lat1, lon1), (lat2, lon2) = (tuple(map(math.radians, p)) for p in (a, b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(min(h, 1.0)))


@settings(max_examples=300, deadline=None)
@given(lat=st.floats(-90, 90), lon=st.floats(-180, 180), grid_km=st.sampled_from([1.0, 5.0, 10.0, 25.0]))
def test_coarsened_location_is_its_cells_centre(lat: float, lon: float, grid_km: float) -> None:
    centre = coarsen_location(lat, lon, grid_km)
    assert coarsen_location(*centre, grid_km) == centre
    assert distance_km((lat, lon), centre) <= 0.75 * grid_km


@pytest.mark.parametrize("lat", [0.0, 37.3, -61.8, 80.1])
def test_cells_are_about_grid_km_on_the_ground(lat: float) -> None:
    grid_km = 10.0
    centre = coarsen_location(lat, 10.0, grid_km)
    north = coarsen_location(centre[0] + grid_km / 111.2, 10.0, grid_km)
    east = coarsen_location(lat, centre[1] + grid_km / (111.2 * math.cos(math.radians(centre[0]))), grid_km)
    assert north[0] > centre[0] and east[0] == centre[0]
    # Rows are not aligned in longitude (each row has its own number of cells): the north step is in latitude.
    for step in (distance_km(centre, (north[0], centre[1])), distance_km(centre, east)):
        assert 0.9 * grid_km <= step <= 1.1 * grid_km
    near = (centre[0] + 0.3 * grid_km / 111.2, centre[1] - 0.3 * grid_km / (111.2 * math.cos(math.radians(lat))))
    assert coarsen_location(*near, grid_km) == centre  # one cell, one answer


def test_coarsening_edges() -> None:
    assert coarsen_location(12.0, 180.0, 10.0) == coarsen_location(12.0, -180.0, 10.0)
    assert coarsen_location(90, 0, 10.0)[0] < 90 and coarsen_location(-90, 0, 10.0)[0] > -90
    assert coarsen_location(48.85, 2.35, 1e6) == (0.0, 0.0)  # a grid larger than the Earth: one cell
    assert coarsen_location(48.8566, 2.3522, 1.0) != coarsen_location(48.8566, 2.3522, 50.0)


@pytest.mark.parametrize("args", [(math.nan, 0.0, 10.0), (0.0, math.inf, 10.0), (0.0, 0.0, math.nan),
                                  (90.5, 0.0, 10.0), (-91.0, 0.0, 10.0), (0.0, 180.1, 10.0), (0.0, -181.0, 10.0),
                                  (0.0, 0.0, 0.0), (0.0, 0.0, -5.0), ("1", 0.0, 10.0), (True, 0.0, 10.0)])
def test_bad_locations_are_value_errors(args) -> None:
    with pytest.raises(ValueError):
        coarsen_location(*args)
