"""Host cost of one eager ``lcconv::fftconv`` call on the CUDA path, measured on a CPU machine.

The Triton launch itself cannot run without a GPU, so the kernels are stubbed (a launch does
nothing) and ``flashconv.supports`` is forced true for CPU tensors: what remains is everything
the op does in Python up to the launch (dispatch, validation, selection, launch parameters,
constants, allocations). Reports microseconds per call (forward, forward+backward), the torch
ops each call dispatches (counted with the autograd profiler), and the top of a cProfile.

    PYTHONPATH=$PWD python scripts/profile_host.py [--shape 2 4 1024] [--calls 2000] [--profile]

On a GPU the same numbers come from ``benchmarks/bench_fftconv.py --tables host`` (wall clock
against CUDA events); this script is for finding where host time goes, not for targets.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # no driver here: JIT objects must not need one

import torch  # noqa: E402

import lcconv_compile  # noqa: E402,F401
from lcconv_compile.kernels import flashconv  # noqa: E402


class _NoLaunch:
    """Stands in for a Triton kernel: indexing with a grid and calling do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels():
    flashconv.supports = lambda u, k: u.dtype in flashconv.MAX_SEQLEN and u.shape[-1] <= flashconv.MAX_SEQLEN[u.dtype]
    for name in ("_spectrum_kernel", "_fftconv_fwd_kernel", "_fftconv_bwd_kernel"):
        setattr(flashconv, name, _NoLaunch())


def count_ops(fn) -> collections.Counter:
    """Torch ops one call of ``fn`` dispatches, nested ones included (the autograd profiler sees
    inside our ops' bodies, which a TorchDispatchMode would treat as leaves)."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return collections.Counter(e.name for e in prof.function_events
                               if e.name.startswith(("aten::", "lcconv::")))


def make_inputs(shape, dtype, requires_grad):
    B, H, L = shape
    u = torch.randn(B, H, L, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(H, L, requires_grad=requires_grad)
    D = torch.randn(H, requires_grad=requires_grad)
    return u, k, D


def per_call_us(fn, calls):
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[2, 4, 1024])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile")
    args = parser.parse_args()
    stub_kernels()
    torch.set_num_threads(1)
    u, k, D = make_inputs(args.shape, torch.bfloat16, requires_grad=False)
    ug, kg, Dg = make_inputs(args.shape, torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.shape, dtype=torch.bfloat16)

    def forward():
        lcconv_compile.fftconv(u, k, D)

    def forward_backward():
        y = lcconv_compile.fftconv(ug, kg, Dg)
        torch.autograd.grad(y, (ug, kg, Dg), grad)

    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        us = per_call_us(fn, args.calls)
        counter = count_ops(fn)
        print(f"{name:>17}: {us:7.1f} us/call on this CPU, {sum(counter.values())} torch ops/call: "
              + ", ".join(f"{op} x{n}" for op, n in counter.most_common()))
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                fn()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
