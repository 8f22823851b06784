"""speciesclf: a trained image classifier as a production component.

:class:`Classifier` loads a model (a bundle, a registry reference, a built-in model or a raw model file)
and answers with :class:`Prediction` objects. Underneath, the preprocessing core (:func:`decode`,
:func:`preprocess_batch` under a :class:`PreprocessSpec`) runs in a native C++ extension
(``speciesclf._native``) or its pure-Python twin; ``device="cuda"`` runs it on a GPU (:mod:`speciesclf.gpu`,
loaded on first use).
"""

from ._version import __version__
from .bundle import Bundle, BundleError, Label, Manifest, UnknownRule, create_bundle
from .classifier import Classifier, Prediction, Predictions
from .decoding import decode
from .errors import (
    CudaUnavailableError,
    DecodeError,
    EmptyInputError,
    GpuError,
    ImageError,
    ImageReadError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidBase64Error,
    InvalidImageError,
    ModelOutputError,
    ModelRuntimeError,
    PayloadTooLargeError,
    UnsupportedFormatError,
    UrlFetchError,
    UrlNotAllowedError,
)
from .fetch import UrlPolicy
from .info import build_info, info
from .preprocess import Batch, preprocess_batch
from .registry import Registry, RegistryError
from .runtimes import ModelInputError
from .spec import PreprocessSpec

__all__ = [
    "__version__",
    "Batch",
    "Bundle",
    "BundleError",
    "Classifier",
    "CudaUnavailableError",
    "DecodeError",
    "EmptyInputError",
    "GpuError",
    "ImageError",
    "ImageReadError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "InvalidBase64Error",
    "InvalidImageError",
    "ModelInputError",
    "ModelOutputError",
    "ModelRuntimeError",
    "Label",
    "Manifest",
    "PayloadTooLargeError",
    "Prediction",
    "Predictions",
    "PreprocessSpec",
    "Registry",
    "RegistryError",
    "UnknownRule",
    "UnsupportedFormatError",
    "UrlFetchError",
    "UrlNotAllowedError",
    "UrlPolicy",
    "build_info",
    "create_bundle",
    "decode",
    "info",
    "preprocess_batch",
]
