"""set_num_threads and get_num_threads: the compiled core's thread pool.

Bounds on both paths, and a thread start the OS refuses, are in test_hostile.py (they run
in a subprocess).
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorbridge import _backend

from conftest import HAS_EXTENSION, random_array

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "reversed", "holes"])
def test_parallel_split_matches(threads, layout):
    rng = np.random.default_rng(threads)
    a = random_array((301, 517), "<f4", rng)
    a = {"contiguous": a, "transposed": a.T, "reversed": a[::-1], "holes": a[::2, 1::3]}[layout]
    out = np.zeros(a.shape, a.dtype)
    old = _backend.ENGINE.C.get_num_threads()
    try:
        _backend.set_num_threads(threads)
        assert _backend.get_num_threads() == threads
        _backend.ENGINE.C.copy(out, a, 0, 1024)  # tiny parallel threshold: always split
    finally:
        _backend.set_num_threads(old)
    np.testing.assert_array_equal(out, a)


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match=r"from 1 to 256"):
        _backend.set_num_threads(0)
    with pytest.raises(TypeError, match="int"):
        _backend.set_num_threads(2.5)
