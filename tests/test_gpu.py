"""GPU behaviour of the converter core (skipped without CUDA). Until the CUDA engine lands,
device tensors go through torch's own path; these tests pin the contract it must keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorbridge as tb

from conftest import assert_same, poisoned, random_tensor, reference_numpy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.complex64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cuda_to_numpy_matches_idiom(gen, dtype, layout):
    x = random_tensor((257, 129), dtype, gen).cuda()
    x = x.t() if layout == "transposed" else x
    expected = reference_numpy(x)
    assert_same(tb.to_numpy(x), expected)
    out = poisoned(tuple(x.shape), expected.dtype)
    assert tb.to_numpy(x, out=out, non_blocking=True).wait() is out
    assert_same(out, expected)


def test_cuda_to_tensor_casts_on_device(gen):
    a = random_tensor((64, 64, 3), torch.uint8, gen).numpy()
    t = tb.to_tensor(a, "cuda", dtype=torch.float32)
    assert t.device.type == "cuda" and t.dtype == torch.float32
    assert torch.equal(t.cpu(), torch.from_numpy(a).float())
    out = torch.empty(a.shape, dtype=torch.uint8, device="cuda")
    assert tb.to_tensor(a, out=out) is out
    assert torch.equal(out.cpu(), torch.from_numpy(a))


def test_empty_pinned_is_pinned():
    a = tb.empty_pinned((1024,), np.float32)
    assert tb.is_pinned(a)
    assert not tb.is_pinned(np.zeros(1024))
