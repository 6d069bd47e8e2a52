"""Launch-parameter and stage exploration for the FlashConv kernels (one factor at a time).

    python benchmarks/explore_flashconv.py --lengths 1024 4096 8192 --out explore.json

For each length: the default launch, then each Tuning field varied alone; forward and backward;
median ms, achieved TFLOP/s (tensor-core work of the block FFT) and relative error vs float64.
Also times the pieces outside the kernel (kernel spectrum) and a plain copy of u (the floor).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from lcconv_compile import reference
from lcconv_compile.kernels import flashconv, monarch


def tensor_core_flops(batch, channels, seqlen, backward=False):
    plan = monarch.plan_for(seqlen)
    per_pair = 8 * plan.fft_size * plan.n1 + 16 * plan.fft_size * plan.n2  # fwd + inv, 4 real dots each
    pairs = triton.cdiv(batch, 2) * channels
    return per_pair * pairs * (2 if backward else 1)  # bwd: two forward tiles + one inverse, ~2x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--out", default="explore_flashconv.json")
    args = parser.parse_args()
    B, H = args.batch, args.channels
    results = []
    for L in args.lengths:
        plan = monarch.plan_for(L)
        u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(H, L, device="cuda") / math.sqrt(L)
        D = torch.randn(H, device="cuda")
        dy = torch.randn_like(u)
        want = reference.fftconv_ref(u.double(), k.double(), D.double())
        copy_ms = triton.testing.do_bench(lambda: u.clone(), return_mode="median")
        spec_ms = triton.testing.do_bench(lambda: flashconv.kernel_spectrum(k, plan, "fp16"), return_mode="median")
        print(f"L={L} plan={plan} copy(u)={copy_ms:.3f} ms kernel_spectrum={spec_ms:.3f} ms")
        variants = [("default", flashconv.Tuning())]
        for pairs in (1, 2, 4, 8):
            variants.append((f"pairs={pairs}", flashconv.Tuning(pairs=pairs)))
        for chunk in (16, 32, 64, 128):
            if chunk <= plan.n1:
                variants.append((f"chunk={chunk}", flashconv.Tuning(chunk=chunk)))
        for warps in (4, 8, 16):
            variants.append((f"warps={warps}", flashconv.Tuning(num_warps=warps)))
        for precision in ("tf32",):
            variants.append((f"precision={precision}", flashconv.Tuning(precision=precision)))
        for per_sm in (1, 2, 8):
            variants.append((f"programs_per_sm={per_sm}", flashconv.Tuning(programs_per_sm=per_sm)))
        for name, tuning in variants:
            row = dict(L=L, variant=name)
            try:
                y = flashconv.fftconv_fwd(u, k, D, tuning=tuning)
                row["rel_err"] = ((y.double() - want).norm() / want.norm()).item()
                row["fwd_ms"] = triton.testing.do_bench(lambda: flashconv.fftconv_fwd(u, k, D, tuning=tuning),
                                                        return_mode="median")
                row["fwd_tflops"] = tensor_core_flops(B, H, L) / row["fwd_ms"] / 1e9
                if args.backward:
                    row["bwd_ms"] = triton.testing.do_bench(
                        lambda: flashconv.fftconv_bwd(dy, u, k, D, tuning=tuning), return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a variant may not fit (shared memory, registers)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            results.append(row)
            print("  ", {k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
        del u, k, D, dy, want
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
