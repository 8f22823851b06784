"""Byte-level facts about encoded images: format sniffing, EXIF orientation, PNG chunk CRCs, and the
lossless removal of metadata (for speciesclf.capture.privacy).

Pure-Python twins of csrc/formats.cpp and csrc/exif.cpp: the two backends must agree on what a file is
and which way up it goes, so neither relies on Pillow's more forgiving readers for these decisions.
"""

from __future__ import annotations

import itertools
import re
import struct
import zlib

from ..errors import DecodeError

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


def _tiff_orientation_tag(tiff: bytes) -> int | None:
    """The orientation tag of an EXIF block: 1..8, 1 for a tag that holds no usable value, None where the
    block has no orientation tag or cannot be read (then a file's XMP may still say, as for Pillow)."""
    if tiff.startswith(b"Exif\x00\x00"):
        tiff = tiff[6:]
    if len(tiff) < 8:
        return None
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return None
    if struct.unpack_from(order + "H", tiff, 2)[0] != 42:
        return None
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    if ifd > len(tiff) or len(tiff) - ifd < 2:
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(count):
        entry = ifd + 2 + i * 12
        if entry + 12 > len(tiff):
            return None
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
    return None


def _tiff_orientation(tiff: bytes) -> int:
    return _tiff_orientation_tag(tiff) or 1


# Pillow's Image.getexif reads XMP's tiff:Orientation, as attribute or element, with this pattern: a
# search, not an XML parse, so neither nesting nor size costs more than one linear pass.
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([0-9])')
_JPEG_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"


def _xmp_orientation(data: bytes, start: int = 0, end: int | None = None) -> int | None:
    """tiff:Orientation of an XMP packet (data[start:end]): 1..8, 1 for 0 or 9, None when it has none."""
    found = _XMP_ORIENTATION.search(data, start, len(data) if end is None else end)
    if found is None:
        return None
    value = int(found[1])
    return value if 1 <= value <= 8 else 1


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
    """(marker, start, end) of each marker of a JPEG, in order, through every scan up to and including EOI:
    fill bytes are skipped a run at once and a scan's entropy-coded data up to the next marker, so a hostile
    file cannot make this step byte by byte. Markers without a length (RSTn, TEM, EOI) come as
    (marker, start, start + 2). Stops at the first thing that is not a marker, or at a segment running past
    the end; only a whole file ends with (0xD9, ...)."""
    pos, size = 2, len(data)
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:
            pos = _FILL.match(data, pos).end() - 1
            continue
        if marker == 0xD9:
            yield marker, pos, pos + 2
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            yield marker, pos, pos + 2
            pos += 2
            continue
        if pos + 4 > size:
            return
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


def _jpeg_orientation(data: bytes) -> int | None:
    """The first EXIF segment's orientation tag, else the last XMP segment's tiff:Orientation (Pillow's
    JpegImagePlugin keeps the last one); None where neither has one."""
    tag, seen_exif, xmp = None, False, None
    for marker, start, end in _jpeg_segments(data):
        if _is_exif_segment(data, marker, start, end):
            if not seen_exif:
                tag, seen_exif = _tiff_orientation_tag(data[start + 10 : end]), True
        elif marker == 0xE1 and data.startswith(_JPEG_XMP_ID, start + 4, end):
            xmp = (start + 4 + len(_JPEG_XMP_ID), end)
    if tag is None and xmp is not None:
        tag = _xmp_orientation(data, *xmp)
    return tag


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


# A PNG's orientation, as Pillow finds it: the eXIf chunk; else the "Raw profile type exif" text chunk
# (ImageMagick's: hex after three header lines, in tEXt, zTXt or iTXt); then, if neither holds an
# orientation tag, the XMP packet (a text chunk "XML:com.adobe.xmp"). Of several chunks of one kind the
# last counts (Pillow's info dict keeps the last), also after the image data. Twin of png_orientation in
# csrc/png_decode.cpp.
PNG_RAW_PROFILE_KEY = b"Raw profile type exif"
PNG_XMP_KEY = b"XML:com.adobe.xmp"
# Compressed text past this is ignored (Pillow's PngImagePlugin.MAX_TEXT_CHUNK refuses the file): only
# the last chunk of each kind is ever inflated, so a file costs at most two such inflations.
PNG_TEXT_BUDGET = 1 << 20
_PNG_TEXT_KINDS = (b"tEXt", b"zTXt", b"iTXt")


def _png_text_carrier(data: bytes, kind: bytes, start: int, end: int) -> tuple[bytes, int, bool] | None:
    """(keyword, where the text starts, compressed?) of a text chunk with a keyword we read, or None.

    tEXt and zTXt chunks without a separator hold the keyword and an empty text, as Pillow reads them;
    an iTXt chunk with a broken header, and a zTXt or iTXt chunk compressed by an unknown method, are
    no carriers at all (Pillow skips them, or refuses the file)."""
    for keyword in (PNG_RAW_PROFILE_KEY, PNG_XMP_KEY):
        after = start + len(keyword)
        if after <= end and data.startswith(keyword, start) and (after == end or data[after] == 0):
            break
    else:
        return None
    if after == end:
        return None if kind == b"iTXt" else (keyword, end, False)
    text = after + 1
    if kind == b"tEXt":
        return keyword, text, False
    if kind == b"zTXt":
        if text == end:
            return keyword, end, False
        return (keyword, text + 1, True) if data[text] == 0 else None
    if end - text < 2:
        return None
    compressed, method = data[text] != 0, data[text + 1]
    language_end = data.find(b"\x00", text + 2, end)
    translated_end = data.find(b"\x00", language_end + 1, end) if language_end >= 0 else -1
    if translated_end < 0 or (compressed and method != 0):
        return None
    return keyword, translated_end + 1, compressed


def _png_text(data: bytes, start: int, end: int, compressed: bool) -> bytes | None:
    """A text chunk's text; None where it does not inflate, or inflates past PNG_TEXT_BUDGET. A zlib
    stream cut short gives what it holds, as Python's zlib (so Pillow) gives it."""
    if not compressed:
        return data[start:end]
    try:
        text = zlib.decompressobj().decompress(memoryview(data)[start:end], PNG_TEXT_BUDGET + 1)
    except zlib.error:
        return None
    return None if len(text) > PNG_TEXT_BUDGET else text


def _raw_profile_exif(text: bytes) -> bytes | None:
    """The EXIF block of a raw profile: Pillow's bytes.fromhex("".join(text.split("\n")[3:])); None for
    anything that is not hex digits in pairs with ASCII whitespace between them."""
    lines = text.split(b"\n", 3)
    if len(lines) < 4:
        return b""
    try:
        return bytes.fromhex(lines[3].replace(b"\n", b"").decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def png_critical_chunks(data: bytes) -> bytes:
    """The PNG with only its critical chunks (IHDR, PLTE, IDAT, IEND), as csrc/png_decode.cpp hands them to
    libspng: no ancillary chunk changes the RGB we produce, and Pillow refuses some harmless ones (text
    that inflates past its limit). A chunk running past the end is kept as it is, for the decoder to report."""
    parts, pos, size = [data[:8]], 8, len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        if length > size - pos - 12:
            break
        kind = data[pos + 4 : pos + 8]
        if not kind[0] & 0x20:
            parts.append(data[pos : pos + 12 + length])
        pos += 12 + length
        if kind == b"IEND":
            return b"".join(parts)
    parts.append(data[pos:])
    return b"".join(parts)


def _png_orientation(data: bytes) -> int | None:
    exif = None
    carriers: dict[bytes, tuple[int, int, bool]] = {}
    pos, size = 8, len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        if length > size - pos - 12:
            break  # truncated: the decoder reports it
        kind, start, end = data[pos + 4 : pos + 8], pos + 8, pos + 8 + length
        if kind == b"eXIf":
            exif = (start, end)
        elif kind in _PNG_TEXT_KINDS:
            carrier = _png_text_carrier(data, kind, start, end)
            if carrier is not None:
                carriers[carrier[0]] = (carrier[1], end, carrier[2])
        elif kind == b"IEND":
            break
        pos = end + 4
    tag = None
    if exif is not None:
        tag = _tiff_orientation_tag(data[exif[0] : exif[1]])
    elif PNG_RAW_PROFILE_KEY in carriers:
        text = _png_text(data, *carriers[PNG_RAW_PROFILE_KEY])
        block = _raw_profile_exif(text) if text is not None else None
        tag = _tiff_orientation_tag(block) if block else None
    if tag is None and PNG_XMP_KEY in carriers:
        text = _png_text(data, *carriers[PNG_XMP_KEY])
        tag = _xmp_orientation(text) if text is not None else None
    return tag


_WEBP_EXIF_FLAG, _WEBP_XMP_FLAG = 0x08, 0x04


def _webp_orientation(data: bytes) -> int | None:
    """As libwebp's demuxer (so Pillow) reads it: only an extended file (VP8X first) has metadata, and
    only the kinds its flags declare; the first EXIF chunk's tag, else the first XMP chunk's; nothing
    past the RIFF size counts."""
    if len(data) < 21 or data[12:16] != b"VP8X":
        return None
    flags = data[20]
    size = min(len(data), 8 + struct.unpack_from("<I", data, 4)[0])
    exif = xmp = None
    pos = 12
    while pos + 8 <= size:
        (length,) = struct.unpack_from("<I", data, pos + 4)
        if length > size - pos - 8:
            break
        kind, start = data[pos : pos + 4], pos + 8
        if kind == b"EXIF" and flags & _WEBP_EXIF_FLAG and exif is None:
            exif = (start, start + length)
        elif kind == b"XMP " and flags & _WEBP_XMP_FLAG and xmp is None:
            xmp = (start, start + length)
        pos += 8 + length + (length & 1)
    tag = _tiff_orientation_tag(data[exif[0] : exif[1]]) if exif is not None else None
    if tag is None and xmp is not None:
        tag = _xmp_orientation(data, *xmp)
    return tag


def orientation_tag(data: bytes, fmt: str | None) -> int | None:
    """The orientation a file declares, 1..8, from the carriers exif_orientation reads; None where none of
    them has an orientation tag (a tag that holds no usable value reads as 1)."""
    if fmt == JPEG:
        return _jpeg_orientation(data)
    if fmt == PNG:
        return _png_orientation(data)
    if fmt == WEBP:
        return _webp_orientation(data)
    return None


def exif_orientation(data: bytes, fmt: str | None) -> int:
    """Orientation 1..8 from EXIF (or, where EXIF has no orientation tag, XMP; in PNG also ImageMagick's
    raw-profile text chunk); anything malformed reads as 1 (upright) rather than losing the image."""
    return orientation_tag(data, fmt) or 1


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


# --- metadata removal: what a stored image keeps. Each function copies the kept bytes as they are (no
# re-encoding, so the decoded pixels cannot change) and returns the names of what it dropped. Anything
# past the format's end (after EOI, IEND, or the RIFF size) is dropped too: such trailers are where phones
# append second images and vendor data. A file that does not reach its end is a DecodeError: metadata
# could hide in what cannot be walked.

# APPn segments kept, by marker and identifier: they change how the pixels decode or display.
_JPEG_KEPT_APP = {0xE0: b"JFIF\x00", 0xE2: b"ICC_PROFILE\x00", 0xEE: b"Adobe"}
_JPEG_APP_NAMES = {b"Exif": "Exif", b"http://ns.adobe.com/xap/1.0/": "XMP",
                   b"http://ns.adobe.com/xmp/extension/": "XMP extension", b"Photoshop 3.0": "IPTC"}


def _jpeg_segment_name(data: bytes, marker: int, start: int, end: int) -> str:
    if marker == 0xFE:
        return "COM"
    identifier = data[start + 4 : min(end, start + 4 + 40)].split(b"\x00", 1)[0]
    label = _JPEG_APP_NAMES.get(identifier) or chunk_name(identifier[:16])
    return f"APP{marker - 0xE0} {label}".rstrip()


def jpeg_without_metadata(data: bytes) -> tuple[bytes, list[str]]:
    """The JPEG without its APPn and COM segments but APP0 JFIF, APP2 ICC_PROFILE (every chunk) and APP14
    Adobe, wherever they are (also between the scans of a progressive file), and without bytes after EOI.
    Every other marker, fill byte and the entropy-coded data stay byte for byte."""
    parts, removed, kept_from = [], [], 0
    for marker, start, end in jpeg_markers(data):
        if marker == 0xD9:
            parts.append(data[kept_from:end])
            if end < len(data):
                removed.append("data after EOI")
            return b"".join(parts), removed
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            kept = _JPEG_KEPT_APP.get(marker)
            if kept is None or not data.startswith(kept, start + 4, end):
                parts.append(data[kept_from:start])
                kept_from = end
                removed.append(_jpeg_segment_name(data, marker, start, end))
    raise DecodeError("JPEG is truncated or damaged: its markers end before the end-of-image marker")


# Ancillary chunks kept: each affects how the pixels decode or display (transparency, colour, animation);
# all other ancillary chunks go (eXIf, tEXt, zTXt, iTXt, tIME, and private ones such as C2PA's caBX).
_PNG_KEPT_ANCILLARY = frozenset({b"tRNS", b"cHRM", b"gAMA", b"iCCP", b"sBIT", b"sRGB", b"cICP", b"mDCV",
                                 b"cLLI", b"bKGD", b"hIST", b"pHYs", b"sPLT", b"acTL", b"fcTL", b"fdAT"})
_PNG_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})


def png_without_metadata(data: bytes) -> tuple[bytes, list[str]]:
    """The PNG without its metadata chunks and without bytes after IEND; every kept chunk (so its CRC) as
    it was. A CRC mismatch or an unknown critical chunk is a DecodeError, as the native decoder has it."""
    problem = png_crc_problem(data)
    if problem is not None:
        raise DecodeError(f"PNG is damaged: {problem}")
    parts, removed, pos, size = [data[:8]], [], 8, len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        if length > size - pos - 12:
            break
        kind, chunk_end = data[pos + 4 : pos + 8], pos + 12 + length
        if kind in _PNG_CRITICAL or kind in _PNG_KEPT_ANCILLARY:
            parts.append(data[pos:chunk_end])
        elif kind[0] & 0x20:
            removed.append(f"PNG {chunk_name(kind)}")
        else:
            raise DecodeError(f"PNG has an unknown critical chunk '{chunk_name(kind)}'")
        pos = chunk_end
        if kind == b"IEND":
            if pos < size:
                removed.append("data after IEND")
            return b"".join(parts), removed
    raise DecodeError("PNG is truncated: its chunks end before IEND")


# RIFF chunks of a WebP that make its pixels; anything else (EXIF, XMP, unknown chunks) goes.
_WEBP_KEPT = frozenset({b"VP8X", b"VP8 ", b"VP8L", b"ALPH", b"ANIM", b"ANMF", b"ICCP"})


def webp_without_metadata(data: bytes) -> tuple[bytes, list[str]]:
    """The WebP without its EXIF, XMP and unknown chunks, with VP8X's EXIF and XMP flags cleared and the
    RIFF size set to what is left; bytes past the RIFF size are dropped."""
    if len(data) < 20:
        raise DecodeError("WebP is truncated: shorter than a RIFF header and one chunk header")
    end = 8 + struct.unpack_from("<I", data, 4)[0]
    if end > len(data):
        raise DecodeError(f"WebP is truncated: its RIFF size says {end} bytes, the file has {len(data)}")
    parts, removed, pos = [], [], 12
    while pos < end:
        if pos + 8 > end:
            raise DecodeError("WebP is damaged: a chunk header runs past the RIFF size")
        kind, (length,) = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)
        if length > end - pos - 8:
            raise DecodeError(f"WebP is damaged: chunk '{chunk_name(kind)}' runs past the RIFF size")
        chunk_end = min(pos + 8 + length + (length & 1), end)  # the pad byte, where the writer left one
        if kind in _WEBP_KEPT:
            parts.append(data[pos:chunk_end])
        else:
            removed.append(f"WebP {chunk_name(kind).rstrip()}")
        pos = chunk_end
    if not parts:
        raise DecodeError("WebP has no image chunk")
    if end < len(data):
        removed.append("data after RIFF")
    body = bytearray(b"".join(parts))
    if body.startswith(b"VP8X") and len(body) > 8:
        body[8] &= ~(_WEBP_EXIF_FLAG | _WEBP_XMP_FLAG) & 0xFF
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + bytes(body), removed
