"""A few FlashConv v6 forward launches for Nsight Compute to read (tensor-core utilisation of the
4K forward, issue 22's target): run under ncu on the device, e.g.

    ncu --clock-control none --kernel-name regex:_fwd_kernel --launch-skip 2 --launch-count 1 \\
        --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,\\
sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,\\
gpu__time_duration.sum \\
        python3 benchmarks/profile_monarch_conv.py --length 4096

(GMMA is Hopper's warpgroup MMA, the instruction v6 issues; HMMA counters stay near 0 for it.)
Shapes as explore_monarch_conv.py: B=8, H=1024, u bf16, k and D float32.
"""

import argparse
import math

import torch

from lcconv_compile.kernels import monarch_conv


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args()
    L = args.length
    u = torch.randn(args.batch, args.channels, L, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(args.channels, L, device="cuda") / math.sqrt(L)
    D = torch.randn(args.channels, device="cuda")
    for _ in range(args.launches):
        monarch_conv.fftconv_fwd(u, k, D)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
