"""The predict protocol: what a :class:`~speciesclf.Classifier` and a :class:`~speciesclf.rollout.Deployment`
of versions both offer, so that the service, the CLI and user code take either."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from ..preprocessing.spec import PreprocessSpec

__all__ = ["Predictor"]


@runtime_checkable
class Predictor(Protocol):
    """Images in, :class:`~speciesclf.Prediction` out. ``model`` names the version answering by default
    (``name@version``); ``labels`` and ``spec`` are the contract every version behind it shares."""

    @property
    def model(self) -> str: ...

    @property
    def labels(self) -> list[str]: ...

    @property
    def spec(self) -> PreprocessSpec: ...

    @property
    def device(self) -> str: ...

    def predict(self, x: Any, *, top_k: int = 5, on_error: str = "return", **options: Any) -> Any: ...

    def predict_batch(self, xs: Iterable[Any], *, top_k: int = 5, on_error: str = "return", **options: Any) -> Any: ...

    def predict_iter(self, iterable: Iterable[Any], *, batch_size: int | None = None, top_k: int = 5,
                     **options: Any) -> Iterator[Any]: ...

    def close(self) -> None: ...
