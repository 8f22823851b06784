"""speciesclf: a trained image classifier as a production component.

The preprocessing core: :func:`decode` and :func:`preprocess_batch` under a :class:`PreprocessSpec`,
run by a native C++ extension (``speciesclf._native``) or its pure-Python twin.
"""

from ._version import __version__
from .decoding import decode
from .errors import (
    DecodeError,
    EmptyInputError,
    ImageError,
    ImageReadError,
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedFormatError,
)
from .info import build_info, info
from .preprocess import Batch, preprocess_batch
from .spec import PreprocessSpec

__all__ = [
    "__version__",
    "Batch",
    "DecodeError",
    "EmptyInputError",
    "ImageError",
    "ImageReadError",
    "ImageTooLargeError",
    "InvalidImageError",
    "PreprocessSpec",
    "UnsupportedFormatError",
    "build_info",
    "decode",
    "info",
    "preprocess_batch",
]
