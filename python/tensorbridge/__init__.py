"""tensorbridge: the fastest correct way to move arrays between NumPy and PyTorch.

Example:
    >>> import torch, tensorbridge as tb
    >>> tb.to_numpy(torch.arange(3))
    array([0, 1, 2])
"""

from typing import TYPE_CHECKING

from ._backend import FallbackWarning, get_num_threads, info, set_num_threads
from ._batch import to_device, to_numpy_batch
from ._convert import from_numpy, to_numpy, to_tensor
from ._cuda import transfer_options
from ._handle import Transfer
from ._loader import Prefetcher, collate, images_to_tensor
from ._packed import PackedBatch
from ._pinned import empty_pinned, is_pinned, pin, pinned, pinned_stats, set_pinned_budget, unpin
from ._ranks import rank_device
from ._registry import registration_options
from ._version import __version__

__all__ = [
    "FallbackWarning",
    "PackedBatch",
    "Prefetcher",
    "Transfer",
    "__version__",
    "collate",
    "empty_pinned",
    "from_numpy",
    "get_num_threads",
    "images_to_tensor",
    "info",
    "is_pinned",
    "pin",
    "pinned",
    "pinned_stats",
    "rank_device",
    "registration_options",
    "set_num_threads",
    "set_pinned_budget",
    "to_device",
    "to_numpy",
    "to_numpy_batch",
    "to_tensor",
    "transfer_options",
    "unpin",
]

if not TYPE_CHECKING:  # (type checkers would read any attribute as this function's)

    def __getattr__(name: str) -> object:
        if name == "ray":
            raise AttributeError(
                "module 'tensorbridge' has no attribute 'ray' until it is imported: "
                "import tensorbridge.ray (it needs Ray)."
            )
        raise AttributeError(f"module 'tensorbridge' has no attribute {name!r}")


del TYPE_CHECKING  # (not part of the package's namespace)
