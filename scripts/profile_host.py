"""Host cost of one eager ``lcconv::fftconv`` call on the CUDA path, measured on a CPU machine.

The Triton launch itself cannot run without a GPU, so FlashConv v5's kernels are stubbed (a launch
does nothing) and ``blockfft_conv.supports`` is made true for CPU tensors: what remains is everything
the op does in Python up to the launch (dispatch, validation, selection, launch parameters,
constants, allocations). Reports microseconds per call for each layer, from the launcher alone up
to the public function with autograd, the torch ops each call dispatches (counted with the
autograd profiler), and optionally the top of a cProfile.

    PYTHONPATH=$PWD python scripts/profile_host.py [--shape 2 4 1024] [--calls 2000] [--profile]

On a GPU the same layers are timed with real launches by
``benchmarks/bench_fftconv.py --tables host`` (wall clock against CUDA events); this script is for
finding where host time goes, not for targets.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import time

import sys  # noqa: E402

if "--cuda" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no driver here: JIT objects must not need one

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import lcconv_compile  # noqa: E402,F401
from lcconv_compile import ops  # noqa: E402
from lcconv_compile.kernels import blockfft_conv  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * factor, mask=i < n)


class _NoLaunch:
    """Stands in for a Triton kernel: indexing with a grid and calling do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels():
    blockfft_conv.supports = lambda u, k: (u.dtype in blockfft_conv.MAX_SEQLEN
                                        and u.shape[-1] <= blockfft_conv.MAX_SEQLEN[u.dtype])
    for name in ("_fftconv_fwd_kernel", "_fftconv_bwd_kernel"):
        setattr(blockfft_conv, name, _NoLaunch())


def count_ops(fn) -> collections.Counter:
    """Torch ops one call of ``fn`` dispatches, nested ones included (the autograd profiler sees
    inside our ops' bodies, which a TorchDispatchMode would treat as leaves)."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return collections.Counter(e.name for e in prof.function_events
                               if e.name.startswith(("aten::", "lcconv::")))


def make_inputs(shape, dtype, requires_grad, device="cpu"):
    B, H, L = shape
    u = torch.randn(B, H, L, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(H, L, device=device, requires_grad=requires_grad)
    D = torch.randn(H, device=device, requires_grad=requires_grad)
    return u, k, D


def per_call_us(fn, calls, sync=lambda: None, repeats=7):
    """Median over ``repeats`` runs of the time to issue one call (hosts shared with other
    work vary by up to 2x between runs: one run is not a measurement)."""
    for _ in range(20):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
        sync()
    return sorted(runs)[len(runs) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[2, 4, 1024])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile")
    parser.add_argument("--cuda", action="store_true",
                        help="on a GPU machine: real kernels and CUDA tensors, time to issue each call")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    if not args.cuda:
        stub_kernels()
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if args.cuda else (lambda: None)
    u, k, D = make_inputs(args.shape, torch.bfloat16, requires_grad=False, device=device)
    ug, kg, Dg = make_inputs(args.shape, torch.bfloat16, requires_grad=True, device=device)
    grad = torch.randn(args.shape, dtype=torch.bfloat16, device=device)

    layers = {
        "launcher (blockfft_conv.fftconv_fwd)": lambda: blockfft_conv.fftconv_fwd(u, k, D),
        "fftconv_forward_impl": lambda: ops.fftconv_forward_impl(u, k, D, None, None, False, None),
        "torch.ops.lcconv.fftconv": lambda: torch.ops.lcconv.fftconv(u, k, D),
        "forward": lambda: lcconv_compile.fftconv(u, k, D),
        "forward, inputs require grad": lambda: lcconv_compile.fftconv(ug, kg, Dg),
        "backward launcher": lambda: blockfft_conv.fftconv_bwd(grad, u, k, D),
    }

    def forward_backward():
        y = lcconv_compile.fftconv(ug, kg, Dg)
        torch.autograd.grad(y, (ug, kg, Dg), grad)

    layers["forward+backward"] = forward_backward
    if args.cuda:  # what this host charges for things that are not ours (the floor under ours)
        from lcconv_compile.kernels import launch

        x = torch.randn(1000, device=device)
        xg = torch.randn(1000, device=device, requires_grad=True)
        gx = torch.randn_like(xg)
        layers.update({
            "baseline: torch.empty": lambda: torch.empty(1000, device=device),
            "baseline: x + 1": lambda: x + 1,
            "baseline: trivial Triton kernel[grid]": lambda: _scale_kernel[(8,)](x, x, 1000, 1.0, BLOCK=128),
            "baseline: trivial kernel via launch()": lambda: launch.launch(_scale_kernel, (8,), x, x, 1000, 1.0,
                                                                            BLOCK=128),
            "baseline: autograd.grad of x * 2": lambda: torch.autograd.grad(xg * 2, xg, gx),
        })
    for name, fn in layers.items():
        us = per_call_us(fn, args.calls, sync)
        counter = count_ops(fn)
        print(f"{name:>36}: {us:7.1f} us/call to issue on {device}, {sum(counter.values())} torch ops/call: "
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
