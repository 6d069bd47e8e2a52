"""A few FlashConv v6 forward launches for Nsight Compute to read (tensor-core utilisation of the
4K forward, issue 22's target): run under ncu on the device, e.g.

    ncu --clock-control none --kernel-name regex:_fwd_kernel --launch-skip 2 --launch-count 1 \\
        --metrics sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,\\
sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,\\
gpu__time_duration.sum \\
        python3 benchmarks/profile_monarch_conv.py --length 4096

(The tensor pipe's active cycles count v6's wgmma: ncu on the H100 reports the GMMA-specific
cycle counter n/a. --candidate i profiles monarch_conv.CANDIDATE_TUNINGS[N2][i].)
Shapes as explore_monarch_conv.py: B=8, H=1024, u bf16, k and D float32.
"""

import argparse
import math

import torch

from lcconv_compile.kernels import monarch_conv, monarch_plan


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--launches", type=int, default=4)
    parser.add_argument("--candidate", type=int, help="index into monarch_conv.CANDIDATE_TUNINGS[N2] "
                        "(default: the dispatched tuning)")
    args = parser.parse_args()
    L = args.length
    u = torch.randn(args.batch, args.channels, L, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(args.channels, L, device="cuda") / math.sqrt(L)
    D = torch.randn(args.channels, device="cuda")
    plan = monarch_plan.plan_for(L)
    tuning = None if args.candidate is None else monarch_conv.CANDIDATE_TUNINGS[plan.n2][args.candidate]
    print(f"L={L} tuning={tuning or monarch_conv.forward_tuning(plan)}", flush=True)
    for _ in range(args.launches):
        monarch_conv.fftconv_fwd(u, k, D, tuning=tuning)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
