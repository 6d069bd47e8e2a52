"""Where FlashButterfly's time goes: CUDA time per kernel of one forward and one backward call,
from torch.profiler (GPU machine). The family is not dispatched (slower than torch.fft); this
says which of K1 / K2 / K3 (and the kz spectrum launch) bounds it.

    python benchmarks/profile_flashbutterfly.py [--shape 2 1024 65536] [--out profile.json]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.profiler import ProfilerActivity, profile

from common import write_results  # this folder
from lcconv_compile.kernels import flashbutterfly as fb


def kernel_times(fn) -> dict[str, float]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA or getattr(event, "cuda_time_total", 0):
            total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total:
                times[event.key] = times.get(event.key, 0.0) + total / 1e3  # ms
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=3, default=[2, 1024, 1 << 16])
    parser.add_argument("--out", default="profile_flashbutterfly.json")
    args = parser.parse_args()
    B, H, L = args.shape
    u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(H, L, device="cuda") / math.sqrt(L)
    D = torch.randn(H, device="cuda")
    dy = torch.randn_like(u)
    print("split", fb.split_for(L, L, u.dtype))
    result = {"shape": [B, H, L], "split": list(fb.split_for(L, L, u.dtype))}
    for name, fn in (("forward", lambda: fb.fftconv_fwd(u, k, D)),
                     ("backward", lambda: fb.fftconv_bwd(dy, u, k, D))):
        times = kernel_times(fn)
        result[name] = times
        print(f"{name}: total {sum(times.values()):.3f} ms")
        for key, ms in list(times.items())[:10]:
            print(f"    {ms:9.3f} ms  {key[:90]}")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
