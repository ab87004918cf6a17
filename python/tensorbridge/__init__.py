"""tensorbridge: the fastest correct way to move arrays between NumPy and PyTorch.

Example:
    >>> import torch, tensorbridge as tb
    >>> tb.to_numpy(torch.arange(3))
    array([0, 1, 2])
"""

from ._backend import get_num_threads, info, set_num_threads
from ._convert import from_numpy, to_numpy, to_tensor
from ._pinned import empty_pinned, is_pinned
from ._transfer import Transfer
from ._transfers import pin, pinned, pinned_stats, set_pinned_budget, transfer_options, unpin
from ._version import __version__

__all__ = [
    "Transfer",
    "__version__",
    "empty_pinned",
    "from_numpy",
    "get_num_threads",
    "info",
    "is_pinned",
    "pin",
    "pinned",
    "pinned_stats",
    "set_num_threads",
    "set_pinned_budget",
    "to_numpy",
    "to_tensor",
    "transfer_options",
    "unpin",
]
