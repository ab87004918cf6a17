# Type stub for the test-only compiled module (csrc/testing/testing_bindings.cpp).
from typing import Any

import numpy as np

from ._C import PackedArrays, PendingCopy

class HostTransferTester:
    def __init__(
        self,
        delay_us: int = 0,
        fail_pinning_after: int = -1,
        budget: int = ...,
        fail_copy_after: int = -1,
    ) -> None: ...
    def to_host(
        self,
        device: np.ndarray,
        dst: np.ndarray,
        chunk_bytes: int = 0,
        buffers: int = 0,
        swap_unit: int = 0,
        threads: int = 0,
    ) -> dict[str, Any]: ...
    def to_device(
        self,
        src: np.ndarray,
        device: np.ndarray,
        chunk_bytes: int = 0,
        buffers: int = 0,
        swap_unit: int = 0,
        threads: int = 0,
    ) -> dict[str, Any]: ...
    def to_device_many(
        self,
        srcs: list[np.ndarray],
        offsets: list[int],
        device: np.ndarray,
        chunk_bytes: int = 0,
        buffers: int = 0,
    ) -> dict[str, Any]: ...
    def to_device_packed(
        self,
        layout: PackedArrays,
        device: np.ndarray,
        chunk_bytes: int = 0,
        buffers: int = 0,
        threads: int = 0,
        wait: bool = False,
    ) -> dict[str, Any]: ...
    def copy_async(self, device: np.ndarray, host: np.ndarray, to_host: bool) -> PendingCopy: ...
    def fail_next_wait(self) -> None: ...
    def drain(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def set_budget(self, bytes: int) -> None: ...
    def trim(self) -> None: ...
    def reserve(self, bytes: int) -> bool: ...
    def unreserve(self, bytes: int) -> None: ...
    @property
    def reserved(self) -> int: ...
    @property
    def live_pinned(self) -> int: ...
    @property
    def pinned_allocations(self) -> int: ...

def plan_chunks(
    shape: list[int], itemsize: int, chunk_bytes: int
) -> list[tuple[int, int, int, list[int], int, int]]: ...
def pool_size_class(nbytes: int) -> int: ...
def numa_map_probe(nbytes: int, node: int) -> dict[str, int]: ...
def numa_preferred_node_of(array: np.ndarray) -> int: ...
def cuda_inject_copy_fault(after: int) -> None: ...
