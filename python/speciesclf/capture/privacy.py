"""Privacy of what capture stores: images without metadata, locations coarsened to a grid.

``strip_metadata`` removes what a photo says about who took it, where and with what (EXIF with its GPS
block and MakerNote, XMP, IPTC, comments, vendor segments, thumbnails, trailers) without touching its pixels:

- JPEG, PNG and WebP lose their metadata losslessly: the kept segments and chunks and the compressed image
  data are copied byte for byte, so every decoder decodes the same pixels. What stays is what changes how
  the pixels decode or display: in JPEG APP0 JFIF, APP2 ICC_PROFILE and APP14 Adobe; in PNG the colour,
  transparency and animation chunks; in WebP the extended header (its EXIF and XMP flags cleared), the
  ICC profile, alpha, animation and the image itself.
- GIF, BMP and TIFF are re-encoded as lossless PNG of the first frame (the one frame a prediction reads),
  in the same mode where PNG has it (1, L, LA, P, RGB, RGBA, I;16), else as RGB. Pixels are identical in
  those modes; their metadata (GIF comments, TIFF tags) is not carried over. ``format`` is then "png".
- The EXIF orientation (or XMP's, as Pillow reads it) is read before it is removed and returned in
  ``orientation``; the pixels stay as stored, so whoever shows or exports the image applies it.
- Input that cannot be walked to its end (truncated, damaged structure) raises DecodeError: metadata could
  hide in what cannot be parsed. The compressed pixel data itself is not decoded here (the prediction that
  came with the image did that), except for the formats re-encoded.

The byte-level walking lives in speciesclf.preprocessing._formats, with the rest of the library's format
knowledge.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

from ..errors import DecodeError, EmptyInputError, ImageTooLargeError, UnsupportedFormatError
from ..preprocessing import _formats
from ..preprocessing.decoding import image_size

__all__ = ["StrippedImage", "strip_metadata", "coarsen_location", "EARTH_RADIUS_KM"]


@dataclasses.dataclass(frozen=True)
class StrippedImage:
    """An image without metadata. ``width`` and ``height`` are as stored (before ``orientation``)."""

    data: bytes
    format: str  # of ``data``: "jpeg", "png" or "webp"
    width: int
    height: int
    orientation: int | None  # 1..8, as the original declared it; None where it declared none
    removed: list[str]  # what was dropped, in file order: "APP1 Exif", "APP13 IPTC", "COM", "PNG tEXt", ...


_LOSSLESS = {_formats.JPEG: _formats.jpeg_without_metadata, _formats.PNG: _formats.png_without_metadata,
             _formats.WEBP: _formats.webp_without_metadata}
_REENCODED = (_formats.GIF, _formats.BMP, _formats.TIFF)
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})


def strip_metadata(data: bytes | bytearray | memoryview) -> StrippedImage:
    """``data`` without its metadata (see the module's docstring for what is kept and why).

    Raises EmptyInputError for no bytes, UnsupportedFormatError for a format the library does not read,
    DecodeError for a damaged or truncated file, ImageTooLargeError for a GIF/BMP/TIFF past Pillow's
    decompression-bomb limit."""
    data = bytes(data)
    if not data:
        raise EmptyInputError("no image bytes to strip")
    fmt = _formats.sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError("not a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    if fmt in _REENCODED:
        return _reencoded_as_png(data, fmt)
    orientation = _formats.orientation_tag(data, fmt)
    stripped, removed = _LOSSLESS[fmt](data)
    width, height = _size(stripped, fmt)
    return StrippedImage(stripped, fmt.lower(), width, height, orientation, removed)


def _size(data: bytes, fmt: str) -> tuple[int, int]:
    size = image_size(data)
    if size is not None:
        return size
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:  # the header only
                return image.size
    except Exception as error:  # Pillow raises many kinds for a header it cannot read
        raise DecodeError(f"{fmt} header cannot be read: {error}") from error


def _reencoded_as_png(data: bytes, fmt: str) -> StrippedImage:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                orientation = image.getexif().get(0x0112) if fmt == _formats.TIFF else None
                image.seek(0)
                image.load()
                if image.mode not in _PNG_MODES:
                    image = image.convert("RGB")
                kept = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
                out = io.BytesIO()
                image.save(out, format="PNG", **kept)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(str(error)) from error
    except Exception as error:  # a damaged file: Pillow's own words, as a typed error
        raise DecodeError(f"{fmt} cannot be decoded: {error}") from error
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = None if orientation is None else 1
    # Pillow writes no text chunks unasked; the PNG pass makes sure of it, and names the ICC profile kept.
    stripped, removed = _formats.png_without_metadata(out.getvalue())
    width, height = image.size
    return StrippedImage(stripped, "png", width, height, orientation, [f"{fmt} re-encoded as PNG", *removed])


EARTH_RADIUS_KM = 6371.0088  # the mean radius (IUGG)
_KM_PER_DEGREE = math.pi * EARTH_RADIUS_KM / 180.0


def coarsen_location(lat: float, lon: float, grid_km: float) -> tuple[float, float]:
    """(lat, lon) moved to the centre of its cell in a grid of cells about ``grid_km`` on a side.

    The grid: latitude in equal rows (180 degrees cut into round(pole-to-pole km / grid_km) rows, at least
    one); each row cut into equal longitude cells of about ``grid_km`` at the row's centre latitude, so
    cells widen in degrees towards the poles (cos(latitude)) and stay about ``grid_km`` wide on the ground.
    Every point of a cell maps to the same centre, so the result tells only the cell; a centre maps to
    itself. Longitude 180 is longitude -180. Raises ValueError for a latitude outside [-90, 90], a
    longitude outside [-180, 180], a grid_km not above 0, or any value that is NaN or infinite."""
    for name, value in (("lat", lat), ("lon", lon), ("grid_km", grid_km)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, not {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not -90.0 <= lat <= 90.0:
        raise ValueError(f"lat must be within [-90, 90], got {lat}")
    if not -180.0 <= lon <= 180.0:
        raise ValueError(f"lon must be within [-180, 180], got {lon}")
    if grid_km <= 0:
        raise ValueError(f"grid_km must be above 0, got {grid_km}")
    rows = max(1, round(180.0 * _KM_PER_DEGREE / grid_km))
    row_degrees = 180.0 / rows
    row = min(int((lat + 90.0) // row_degrees), rows - 1)
    centre_lat = -90.0 + (row + 0.5) * row_degrees
    row_km = 360.0 * _KM_PER_DEGREE * math.cos(math.radians(centre_lat))
    columns = max(1, round(row_km / grid_km))
    column_degrees = 360.0 / columns
    lon = -180.0 if lon == 180.0 else lon
    column = min(int((lon + 180.0) // column_degrees), columns - 1)
    centre_lon = -180.0 + (column + 0.5) * column_degrees
    return centre_lat, centre_lon
