# Stubs for the private native module; use the speciesclf package instead.
from typing import Any

import numpy as np

def preprocess(
    items: list[Any],
    out: Any,
    size: int,
    resize: int,
    filter: int,
    dtype: int,
    layout: int,
    mean: list[float],
    std: list[float],
    max_pixels: int,
    max_bytes: int,
    reduce_margin: float,
    threads: int,
    slots: list[int],
    timings: np.ndarray | None = None,
) -> list[tuple[int, int, str]]: ...
def decode(
    data: bytes | bytearray | memoryview, min_width: int, min_height: int, max_pixels: int, max_bytes: int
) -> tuple[int, str, np.ndarray | None]: ...
def probe(data: bytes | bytearray | memoryview) -> tuple[int, str, int, int]: ...
def build_info() -> dict[str, Any]: ...
def _fused_resize_cpu(
    pixels: np.ndarray,
    orientation: int,
    size: int,
    resize: int,
    filter: int,
    dtype: int,
    layout: int,
    mean: list[float],
    std: list[float],
) -> bytes: ...
def hardware_threads() -> int: ...
def pool_workers() -> int: ...
