# Type stub for the private compiled module (csrc/bindings.cpp).
from typing import Any

import numpy as np

__version__: str
cuda_compiled: bool

def copy(
    dst: np.ndarray, src: np.ndarray, swap_unit: int = 0, min_parallel_bytes: int = 0
) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def cuda_probe() -> dict[str, Any]: ...
def empty_pinned_bytes(nbytes: int) -> np.ndarray: ...  # only when cuda_compiled
def is_host_pinned(array: np.ndarray) -> bool: ...  # only when cuda_compiled
def copy_from_address(
    out: object,
    dtype: np.dtype,
    src: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    swap_unit: int = 0,
) -> int: ...
