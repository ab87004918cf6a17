# Type stub for the private compiled module (csrc/bindings.cpp). The cuda_* functions,
# empty_pinned_bytes, is_host_pinned and array_span exist only when cuda_compiled is True.
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np

__version__: str
cuda_compiled: bool

class _Probe(TypedDict):
    compiled: bool
    device_count: int
    runtime_version: int
    driver_version: int
    error: str | None
    device_names: list[str]
    pci_bus_ids: list[str]

class _Report(TypedDict):
    chunks: int
    staged: bool
    threads: int

class _PoolStats(TypedDict):
    bytes_held: int
    bytes_in_use: int
    budget: int
    hits: int
    misses: int
    waits: int
    fallbacks: int
    pin_failures: int
    frees: int

class _NumaStats(TypedDict):
    numa_placed: int
    numa_refused: int
    numa_error: int

class PendingCopy:
    """A copy queued without waiting; holds the memory it touches until it completes."""

    def done(self) -> bool: ...
    def wait(self) -> None: ...

class PackedArrays:
    """Host arrays checked, grouped by dtype and shape and laid out in one buffer."""

    def __init__(self, arrays: list[np.ndarray], align: int = 256) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def groups(
        self,
    ) -> list[
        tuple[
            np.dtype[Any],
            tuple[int, ...],
            int,
            int,
            list[int],
            tuple[list[int], list[int] | None] | None,
        ]
    ]: ...
    def pack_into(self, out: np.ndarray) -> None: ...

class LinkSimulator:
    """The transfer pipeline and a pinned pool over a simulated link, for benchmarks on
    machines without a GPU; "device memory" is a C-contiguous array (uint8 for packed)."""

    def __init__(
        self, bandwidth_gbs: float, latency_us: float = 0.0, budget: int = 1 << 30
    ) -> None: ...
    def to_host(
        self,
        device: np.ndarray,
        dst: np.ndarray,
        chunk_bytes: int = 0,
        buffers: int = 0,
        threads: int = 0,
        stream: int = 0,
    ) -> _Report: ...
    def to_device(
        self,
        src: np.ndarray,
        device: np.ndarray,
        chunk_bytes: int = 0,
        buffers: int = 0,
        threads: int = 0,
        stream: int = 0,
    ) -> _Report: ...
    def to_device_packed(
        self,
        layout: PackedArrays,
        device: np.ndarray,
        chunk_bytes: int = 0,
        buffers: int = 0,
        threads: int = 0,
        stream: int = 0,
    ) -> _Report: ...
    def copy(
        self, device: np.ndarray, host: np.ndarray, to_host: bool, stream: int = 0
    ) -> None: ...
    def host_ceiling(self, nbytes: int, to_pinned: bool, repeats: int = 5) -> list[float]: ...
    def stats(self) -> _PoolStats: ...
    @property
    def bandwidth_gbs(self) -> float: ...
    @property
    def latency_us(self) -> float: ...

def copy(
    dst: np.ndarray, src: np.ndarray, swap_unit: int = 0, min_parallel_bytes: int = 0
) -> None: ...
def copy_from_address(
    out: object,
    dtype: np.dtype[Any],
    src: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    swap_unit: int = 0,
    serial: bool = False,
) -> int: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def default_pinned_budget() -> int: ...
def cuda_probe() -> _Probe: ...
def call_through_interrupts(fn: Callable[[Any], Any], arg: Any) -> Any: ...
def set_main_thread(ident: int) -> None: ...

# Only when cuda_compiled:
def empty_pinned_bytes(nbytes: int) -> np.ndarray: ...
def cuda_copy_to_host(
    device: int,
    stream: int,
    src: int,
    dst: np.ndarray,
    chunk_bytes: int = 0,
    buffers: int = 0,
    swap_unit: int = 0,
) -> _Report: ...
def cuda_copy_to_device(
    device: int,
    stream: int,
    src: np.ndarray,
    dst: int,
    chunk_bytes: int = 0,
    buffers: int = 0,
    swap_unit: int = 0,
    wait: bool = False,
) -> _Report: ...
def cuda_copy_packed(
    device: int,
    stream: int,
    layout: PackedArrays,
    dst: int,
    chunk_bytes: int = 0,
    buffers: int = 0,
    wait: bool = False,
) -> _Report: ...
def cuda_copy_async(
    device: int, stream: int, dst: int, src: int, nbytes: int, to_host: bool, keepalive: object
) -> PendingCopy: ...
def cuda_copy_pinned(
    device: int, stream: int, host: np.ndarray, device_ptr: int, nbytes: int, to_host: bool
) -> bool: ...
def cuda_copy_small(
    device: int, stream: int, host: np.ndarray, device_ptr: int, nbytes: int, to_host: bool
) -> None: ...
def cuda_host_ceiling(
    device: int, nbytes: int, to_pinned: bool, repeats: int = 5
) -> list[float]: ...
def cuda_pinned_stats() -> _PoolStats: ...
def cuda_set_pinned_budget(bytes: int) -> None: ...
def cuda_set_numa_nodes(nodes: list[int]) -> None: ...
def cuda_numa_stats() -> _NumaStats: ...
def cuda_reserve_pinned(bytes: int) -> bool: ...
def cuda_unreserve_pinned(bytes: int) -> None: ...
def cuda_host_register(array: np.ndarray, device: int = -1) -> bool: ...
def cuda_host_unregister(address: int, nbytes: int) -> bool: ...
def array_span(array: np.ndarray) -> tuple[int, int]: ...
def is_host_pinned(array: np.ndarray, device: int = -1) -> bool: ...
