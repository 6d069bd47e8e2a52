"""Where the short-kernel family stops paying: a sweep of Lk against the FFT family and cuDNN.

    python benchmarks/sweep_shortconv.py --out sweep.json [--kernel-lens 1 4 64] [--quick]

For (B, H, L) in (8, 1024, 4096) and (4, 768, 8192), bf16 u, float32 k and D: forward and
forward+backward median ms of the short kernels (launchers called directly, Lk limit bypassed),
the FFT family (blockfft_conv, FlashConv v5), cuDNN depthwise conv1d (bf16, groups=H, padding Lk-1, cropped) and
the memory floor (bytes / device-to-device copy bandwidth measured in this run). The lead sets
shortconv.SHORT_MAX_KERNEL_LEN from the crossing. Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton

from common import copy_bandwidth, run_metadata, write_results  # this folder: the shared measures
from lcconv_compile.kernels import blockfft_conv, shortconv

SHAPES = [(8, 1024, 4096), (4, 768, 8192)]
KERNEL_LENS = [1, 2, 3, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512]
L2_BYTES = 50 * 2**20  # H100


def median_ms(fn, input_sets) -> float:
    """Median of do_bench, cycling through input sets so repeated calls do not hit in L2."""
    state = {"i": 0}

    def step():
        fn(*input_sets[state["i"] % len(input_sets)])
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=10, rep=40, return_mode="median")


def make_inputs(B, H, L, Lk):
    u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(H, Lk, device="cuda") / math.sqrt(Lk)
    D = torch.randn(H, device="cuda")
    dy = torch.randn_like(u)
    return u, k, D, dy


def candidates():
    """name -> (forward(u, k, D, dy), forward+backward(u, k, D, dy)); cuDNN has no D (skip fused)."""

    def short_fwd(u, k, D, dy):
        shortconv.fftconv_fwd(u, k, D)

    def short_both(u, k, D, dy):
        shortconv.fftconv_fwd(u, k, D)
        shortconv.fftconv_bwd(dy, u, k, D)

    def fft_fwd(u, k, D, dy):
        blockfft_conv.fftconv_fwd(u, k, D)

    def fft_both(u, k, D, dy):
        blockfft_conv.fftconv_fwd(u, k, D)
        blockfft_conv.fftconv_bwd(dy, u, k, D)

    def cudnn(u, k, D, dy, backward):
        Lk = k.shape[-1]
        weight = k.flip(-1).to(u.dtype).unsqueeze(1)  # conv1d correlates: flip for a convolution
        if backward:
            u = u.detach().requires_grad_()
            weight.requires_grad_()
        y = F.conv1d(u, weight, padding=Lk - 1, groups=u.shape[1])[..., : u.shape[-1]]
        if backward:
            torch.autograd.grad(y, (u, weight), dy)

    return {
        "short": (short_fwd, short_both),
        "fft": (fft_fwd, fft_both),
        "cudnn": (lambda *a: cudnn(*a, backward=False), lambda *a: cudnn(*a, backward=True)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="sweep_shortconv.json")
    parser.add_argument("--kernel-lens", type=int, nargs="+", default=KERNEL_LENS)
    args = parser.parse_args()
    shortconv.SHORT_MAX_KERNEL_LEN = max(args.kernel_lens)  # launchers are called directly anyway
    bandwidth = copy_bandwidth("cuda")
    meta = run_metadata()
    print(f"# {meta}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'B,H,L':>16s} {'Lk':>4s} | {'floor':>6s} {'short':>6s} {'fft':>6s} {'cudnn':>6s} | "
          f"{'floor':>6s} {'short':>6s} {'fft':>6s} {'cudnn':>6s}   (fwd | fwd+bwd, ms)")
    rows = []
    for B, H, L in SHAPES:
        set_bytes = 2 * B * H * L * 2  # u and dy in bf16
        sets = max(1, min(4, math.ceil(3 * L2_BYTES / set_bytes)))
        for Lk in args.kernel_lens:
            inputs = [make_inputs(B, H, L, Lk) for _ in range(sets)]
            elems = B * H * L
            # forward: read u, write y; backward: read dy, u, write du (k, D, dk, dD are tiny).
            floor_fwd = 4 * elems / bandwidth * 1e3
            floor_both = floor_fwd + 6 * elems / bandwidth * 1e3
            row = dict(B=B, H=H, L=L, Lk=Lk, floor_fwd=floor_fwd, floor_fwd_bwd=floor_both)
            for name, (fwd, both) in candidates().items():
                try:
                    row[f"{name}_fwd"] = median_ms(fwd, inputs)
                    row[f"{name}_fwd_bwd"] = median_ms(both, inputs)
                except Exception as err:  # e.g. out of memory: recorded, the sweep goes on
                    row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            cells = [row.get(n, math.nan) for n in ("floor_fwd", "short_fwd", "fft_fwd", "cudnn_fwd",
                                                    "floor_fwd_bwd", "short_fwd_bwd", "fft_fwd_bwd",
                                                    "cudnn_fwd_bwd")]
            print(f"{f'{B},{H},{L}':>16s} {Lk:4d} | " + " ".join(f"{c:6.3f}" for c in cells[:4]) + " | "
                  + " ".join(f"{c:6.3f}" for c in cells[4:]), flush=True)
            del inputs
    write_results(args.out, dict(copy_bandwidth_tb_s=bandwidth / 1e12, rows=rows), meta)


if __name__ == "__main__":
    main()
