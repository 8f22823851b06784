"""Byte-level facts about encoded images: format sniffing, EXIF orientation, PNG chunk CRCs.

Pure-Python twins of csrc/formats.cpp and csrc/exif.cpp: the two backends must agree on what a file is
and which way up it goes, so neither relies on Pillow's more forgiving readers for these decisions.
"""

from __future__ import annotations

import itertools
import re
import struct
import zlib

JPEG, PNG, WEBP, GIF, BMP, TIFF = "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"


def sniff_format(data: bytes | memoryview) -> str | None:
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if head.startswith(b"BM"):
        return BMP
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return TIFF
    return None


def _tiff_orientation(tiff: bytes) -> int:
    if tiff.startswith(b"Exif\x00\x00"):
        tiff = tiff[6:]
    if len(tiff) < 8:
        return 1
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return 1
    if struct.unpack_from(order + "H", tiff, 2)[0] != 42:
        return 1
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    if ifd > len(tiff) or len(tiff) - ifd < 2:
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(count):
        entry = ifd + 2 + i * 12
        if entry + 12 > len(tiff):
            return 1
        tag, kind, count = struct.unpack_from(order + "HHI", tiff, entry)
        if tag != 0x0112:
            continue
        if count != 1:  # one value, or the entry is broken
            return 1
        if kind == 3:
            (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
        elif kind == 4:
            (value,) = struct.unpack_from(order + "I", tiff, entry + 8)
        else:
            return 1
        return value if 1 <= value <= 8 else 1
    return 1


_FILL = re.compile(rb"\xff+")
# The next marker after entropy-coded data: 0xFF followed by neither a stuffed 0x00 nor a restart marker.
_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)
MAX_JPEG_SCANS = 500
JPEG_SCAN_PIXEL_BUDGET = 2**31


def jpeg_scan_limit(pixels: int) -> int:
    """Most progressive scans a JPEG of ``pixels`` (full size) may have. Each scan is a pass over the whole
    image, so a few hundred scans of a huge image are seconds of work for a tiny file: the budget keeps any
    image under about a quarter of a second here while real encoders' 6-20 scans always pass.
    The twin of scan_limit in csrc/jpeg_decode.cpp."""
    return max(16, min(MAX_JPEG_SCANS, JPEG_SCAN_PIXEL_BUDGET // max(pixels, 1)))


def jpeg_markers(data: bytes):
    """(marker, start, end) of each marker of a JPEG, in order, through every scan up to EOI: fill bytes are
    skipped a run at once and a scan's entropy-coded data up to the next marker, so a hostile file cannot
    make this step byte by byte. Markers without a length (RSTn, TEM) come as (marker, start, start + 2).
    Stops at the first thing that is not a marker, or at a segment running past the end."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:
            pos = _FILL.match(data, pos).end() - 1
            continue
        if marker == 0xD9:
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            yield marker, pos, pos + 2
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > size:
            return
        yield marker, pos, pos + 2 + length
        pos += 2 + length
        if marker == 0xDA:
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return
            pos = found.start()


def _jpeg_segments(data: bytes):
    """The markers before the image data, as csrc/exif.cpp walks them (EXIF is never after the first scan)."""
    return itertools.takewhile(lambda segment: segment[0] != 0xDA, jpeg_markers(data))


def jpeg_progressive_scans(data: bytes) -> int:
    """The number of scans of a progressive JPEG; 0 for any other JPEG."""
    scans, progressive = 0, False
    for marker, _, _ in jpeg_markers(data):
        if marker in _PROGRESSIVE_SOF:
            progressive = True
        elif marker == 0xDA:
            if not progressive:
                return 0
            scans += 1
    return scans


def _is_exif_segment(data: bytes, marker: int, start: int, end: int) -> bool:
    return marker == 0xE1 and end - start >= 10 and data[start + 4 : start + 10] == b"Exif\x00\x00"


def _jpeg_orientation(data: bytes) -> int:
    for marker, start, end in _jpeg_segments(data):
        if _is_exif_segment(data, marker, start, end):
            return _tiff_orientation(data[start + 10 : end])
    return 1


def without_jpeg_exif(data: bytes) -> bytes:
    """The JPEG without its APP1 "Exif" segments."""
    cuts = [(start, end) for marker, start, end in _jpeg_segments(data) if _is_exif_segment(data, marker, start, end)]
    if not cuts:
        return data
    parts, kept_from = [], 0
    for start, end in cuts:
        parts.append(data[kept_from:start])
        kept_from = end
    parts.append(data[kept_from:])
    return b"".join(parts)


def _png_orientation(data: bytes) -> int:
    pos, size = 8, len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        if length > size - pos - 12:
            return 1
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            return _tiff_orientation(data[pos + 8 : pos + 8 + length])
        if kind == b"IEND":
            return 1
        pos += 12 + length
    return 1


def _webp_orientation(data: bytes) -> int:
    pos, size = 12, len(data)
    while pos + 8 <= size:
        (length,) = struct.unpack_from("<I", data, pos + 4)
        if length > size - pos - 8:
            return 1
        if data[pos : pos + 4] == b"EXIF":
            return _tiff_orientation(data[pos + 8 : pos + 8 + length])
        pos += 8 + length + (length & 1)
    return 1


def exif_orientation(data: bytes, fmt: str | None) -> int:
    """EXIF orientation 1..8; anything malformed reads as 1 (upright) rather than losing the image."""
    if fmt == JPEG:
        return _jpeg_orientation(data)
    if fmt == PNG:
        return _png_orientation(data)
    if fmt == WEBP:
        return _webp_orientation(data)
    return 1


def chunk_name(kind: bytes) -> str:
    """A chunk type as text: printable ASCII as is, any other byte (and ' and \\) as \\xNN. The twin of
    chunk_name in csrc/png_decode.cpp; a hostile file's raw bytes would not even be valid UTF-8."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x27, 0x5C) else f"\\x{b:02x}" for b in kind)


def png_crc_problem(data: bytes) -> str | None:
    """The first chunk whose CRC does not match, as libspng would reject it; None when all match.

    Pillow skips IDAT checksums, so without this the two backends would disagree on damaged files.
    """
    pos, size = 8, len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        if length > size - pos - 12:
            return None  # truncated: the decoder reports it
        kind = data[pos + 4 : pos + 8]
        (stored,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(data[pos + 4 : pos + 8 + length]) != stored:
            return f"CRC mismatch in '{chunk_name(kind)}' chunk"
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None
