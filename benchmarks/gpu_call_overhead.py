"""What tensorbridge's Python layer adds to a GPU transfer call, measured without a GPU.

    python benchmarks/gpu_call_overhead.py [--size 2M] [--repeats 15]

A CPU machine cannot run a GPU copy, but the Python steps around one (checks, routing,
the registration cache, the calls into the compiled core) cost the same there. This
script makes CPU tensors look like CUDA ones and replaces every device call with a stub
that returns at once, then times whole public calls: what is left is tensorbridge's own
per-call cost, the part of goal "within 3 us of torch's pinned copy" a GPU cannot
separate from the DMA. For scale it times torch's own dispatch of ``copy_`` on one
element (a torch copy on a GPU pays at least that in Python and C++). The stubs patch
torch and tensorbridge in this process only; run it as a script, never import it.

Rows: ``to_numpy(t, out=pinned)`` (a page-locked out: the direct path) and
``to_tensor(pinned_a, 'cuda')`` (a page-locked source), each at --size (default 2 MiB,
above the size routing's torch copies); then a 4 KiB ``to_numpy(t, out=out)`` through
torch's ``copy_`` (which really copies here: a CPU copy stands in for the GPU's) and
through the direct call that ``ROUTING.small_direct`` selects.
"""

from __future__ import annotations

import argparse
import platform
import types

import numpy as np
import torch

import tensorbridge as tb
from tensorbridge import _backend, _cuda
from tensorbridge.bench._report import _cpu_model
from tensorbridge.bench._rows import parse_size
from tensorbridge.bench._runner import measure


class _Pending:
    def wait(self) -> None:
        pass

    def done(self) -> bool:
        return True


def _stub_the_device() -> None:
    """Every device call answers at once; CPU tensors pass for CUDA tensors of GPU 0."""
    real = _backend.ENGINE.C
    if real is None:
        raise SystemExit("needs the compiled core (tensorbridge.info()['extension'])")

    class Core:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def is_host_pinned(self, a: np.ndarray, device: int = -1) -> bool:
            return True

        def cuda_copy_async(self, *args: object) -> _Pending:
            return _Pending()

        def cuda_copy_pinned(self, *args: object) -> bool:
            return True

        def cuda_copy_small(self, *args: object) -> None:
            pass

    _backend.ENGINE.C = Core()
    type(_backend.ENGINE).cuda_engine = property(lambda self: True)  # type: ignore[method-assign]
    _backend.resolve_device = lambda device, fn: device  # type: ignore[assignment]
    stream = types.SimpleNamespace(cuda_stream=0)
    torch.cuda.current_stream = lambda device=None: stream  # type: ignore[assignment,misc]
    torch.cuda.current_device = lambda: 0
    _cuda._device_index = lambda device: 0  # type: ignore[assignment]
    if getattr(_cuda, "_raw_stream", None) is not None:
        _cuda._raw_stream = lambda index: 0
    torch.Tensor.is_cuda = property(lambda self: True)  # type: ignore[assignment,method-assign]
    torch.Tensor.is_cpu = property(lambda self: False)  # type: ignore[assignment,method-assign]
    empty = torch.empty
    torch.empty = lambda *a, device=None, **k: empty(*a, **k)  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("2M"))
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    n = args.size // 4
    t = torch.rand(n)
    out = np.empty(n, np.float32)
    a = np.random.default_rng(0).random(n, dtype=np.float32)
    one, one_dst = torch.ones(1), torch.empty(1)
    small_t, small_out = torch.rand(1024), np.empty(1024, np.float32)

    def small(direct: bool) -> object:
        _cuda.ROUTING.small_direct = direct
        return tb.to_numpy(small_t, out=small_out)

    scale = measure(lambda i: one_dst.copy_(one), args.repeats)
    _stub_the_device()
    cuda = torch.device("cuda", 0)
    rows = [
        ("torch: dst.copy_(src) of one element (dispatch alone, for scale)", scale),
        (
            f"tb.to_numpy(t, out=pinned), {args.size >> 20} MiB",
            measure(lambda i: tb.to_numpy(t, out=out), args.repeats),
        ),
        (
            f"tb.to_tensor(pinned_a, 'cuda'), {args.size >> 20} MiB",
            measure(lambda i: tb.to_tensor(a, cuda), args.repeats),
        ),
        (
            "tb.to_numpy(t, out=out), 4 KiB, torch's copy_ (copies 4 KiB here)",
            measure(lambda i: small(False), args.repeats),
        ),
        (
            "tb.to_numpy(t, out=out), 4 KiB, ROUTING.small_direct",
            measure(lambda i: small(True), args.repeats),
        ),
    ]
    print(
        f"tensorbridge {tb.__version__}, torch {torch.__version__}, python "
        f"{platform.python_version()}, {_cpu_model()}; device calls stubbed"
    )
    print(f"{'call':<70} {'us/call':>8}  p10-p90")
    for name, (med, p10, p90, _) in rows:
        print(f"{name:<70} {med * 1e6:8.2f}  [{p10 * 1e6:.2f}-{p90 * 1e6:.2f}]")


if __name__ == "__main__":
    main()
