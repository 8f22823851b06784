"""speciesclf: a trained image classifier as a production component.

:class:`Classifier` loads a model (a bundle, a registry reference, a built-in model or a raw model file)
and answers with :class:`Prediction` objects. Underneath, the preprocessing core (:func:`decode`,
:func:`preprocess_batch` under a :class:`PreprocessSpec`) runs in a native C++ extension
(``speciesclf._native``) or its pure-Python twin; ``device="cuda"`` runs it on a GPU (:mod:`speciesclf.preprocessing.gpu`,
loaded on first use).
"""

from ._version import __version__
from .bundles.bundle import Bundle, BundleError, Label, Manifest, UnknownRule, create_bundle
from .model.classifier import Classifier, Prediction, Predictions
from .preprocessing.decoding import decode
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
from .sources.fetch import UrlPolicy
from .info import build_info, info
from .preprocessing.preprocess import Batch, preprocess_batch
from .bundles.registry import Registry, RegistryError
from .model.protocol import Predictor
from .model.runtimes import ModelInputError
from .preprocessing.spec import PreprocessSpec

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
    "Predictor",
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
