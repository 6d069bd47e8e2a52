"""FlashConv v5 on the GPU: the v5 defaults as first measured ("v5 old": k's spectrum recomputed
per stack) against the v5.1 knobs one at a time (k's spectrum once per item, persistent grid,
prefetch, register caps), torch.fft and the memory floor, with variants that skip stages (what
bounds the kernel); forward, backward and both.

    python benchmarks/explore_blockfft_conv.py --out explore_blockfft_conv.json [--lengths 1024 4096 8192 16384]
                                            [--extra]   # + the "forward" variant, chunk/warp/pair choices

Shapes: B=8, H=1024, u bf16, k and D float32; forward, and forward + backward (kernels called
directly; torch.fft through autograd). The floor is (u read + k read + y write) / the
device-to-device copy bandwidth measured in the same run; forward + backward adds dy, u, k read
and du, dk written. Times are medians of ``triton.testing.do_bench``. Variants other than "full" compute
wrong results on purpose (their error is not reported). The table is printed last; the JSON is
rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import triton

from common import copy_bandwidth, run_metadata, write_results  # this folder
from lcconv_compile import reference
from lcconv_compile.kernels import blockfft_conv


def torch_fft_conv(u, k, D):
    """The idiom people write by hand (the eager baseline)."""
    L = u.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return (y + u.float() * D.unsqueeze(-1)).to(u.dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--extra", action="store_true", help="also the older Tuning rows (v3/v4 were removed: NOTES.md has their numbers)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--out", default="explore_blockfft_conv.json")
    args = parser.parse_args()
    B, H = args.batch, args.channels
    started = time.time()
    bandwidth = copy_bandwidth("cuda")
    meta = run_metadata()
    header = dict(copy_bandwidth_tb_s=bandwidth / 1e12, batch=B, channels=H)
    print(meta, header, flush=True)
    rows = []

    def record(row):
        rows.append(row)
        print("  ", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write_results(args.out, dict(header, rows=rows), meta)

    for L in args.lengths:
        u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(H, L, device="cuda") / math.sqrt(L)
        D = torch.randn(H, device="cuda")
        want = reference.fftconv_ref(u.double(), k.double(), D.double())
        dy = torch.randn_like(u)
        u_bytes, k_bytes = u.numel() * u.element_size(), k.numel() * 4
        floor_ms = (2 * u_bytes + k_bytes) / bandwidth * 1e3
        floor_fb_ms = (5 * u_bytes + 3 * k_bytes) / bandwidth * 1e3
        # Tensor-core work of the data rows (a two-block sequence transforms two blocks per row).
        default = blockfft_conv._launch(u, blockfft_conv.Tuning())
        flops = default.plan.tensor_core_flops() * default.blocks * triton.cdiv(B, 2) * H

        def measure(name, fn, check=True, floor=floor_ms, **extra):
            row = dict(L=L, name=name, floor_ms=floor, **extra)
            try:
                y = fn()
                if check:
                    row["rel_err"] = ((y.double() - want).norm() / want.norm()).item()
                row["ms"] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                row["x_floor"] = row["ms"] / floor
            except Exception as exc:  # noqa: BLE001 - a configuration may not fit (shared memory)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            record(row)
            return row

        measure("torch.fft", lambda: torch_fft_conv(u, k, D))
        launch = blockfft_conv._launch(u, blockfft_conv.Tuning())
        base = measure("v5.1 default", lambda: blockfft_conv.fftconv_fwd(u, k, D), plan=str(launch.plan),
                       blocks=launch.blocks, kernel_spectrum=launch.kernel_spectrum)
        if "ms" in base:
            base["tflops"] = flops / base["ms"] / 1e9  # tensor-core work of the data rows
        # The stage-skipping variants ("io", "no_kernel_spectrum", "forward") and the persistent,
        # prefetch and register-cap knobs were measured and deleted (NOTES.md, "v5.1 knobs").
        old = blockfft_conv.Tuning(kernel_spectrum="recompute")
        tunings = [old]
        if launch.plan.fft_size >= 16384:
            tunings.append(blockfft_conv.Tuning(num_warps=16))
        if args.extra:
            tunings += [blockfft_conv.Tuning(chunk=16), blockfft_conv.Tuning(num_warps=4 if launch.num_warps > 4 else 8)]
            if L <= 2048:
                tunings += [blockfft_conv.Tuning(pairs=p) for p in (1, 2) if p != launch.pairs]
        for tuning in tunings:
            changed = {f: v for f, v in vars(tuning).items() if v is not None}
            name = "v5 old (kernel_spectrum=recompute)" if tuning is old else f"v5.1 {changed}"
            measure(name, lambda: blockfft_conv.fftconv_fwd(u, k, D, tuning=tuning))

        # Forward + backward (the backward's dk/du accuracy is in the GPU tests).
        ut, kt, Dt = (t.detach().clone().requires_grad_(True) for t in (u, k, D))

        def torch_fwd_bwd():
            torch.autograd.grad(torch_fft_conv(ut, kt, Dt), [ut, kt, Dt], dy)

        measure("fwd+bwd torch.fft", torch_fwd_bwd, check=False, floor=floor_fb_ms)
        measure("fwd+bwd v5.1 default", lambda: (blockfft_conv.fftconv_fwd(u, k, D), blockfft_conv.fftconv_bwd(dy, u, k, D)),
                check=False, floor=floor_fb_ms)
        backward_tunings = [("bwd only v5.1 default", blockfft_conv.Tuning()),
                            ("bwd only v5 old (kernel_spectrum=recompute)", old)]
        if launch.plan.fft_size >= 16384:
            # compile_check at (2, 1536, 16K), all options: 8 warps 255 registers + 8.2 KB spilled,
            # 16 warps 128 + 5.6 KB, 4 warps 255 + 25 KB (NOTES, stop 12 continued). Unmeasured.
            backward_tunings.append(("bwd only {'num_warps': 16}", blockfft_conv.Tuning(num_warps=16)))
        for name, tuning in backward_tunings:
            measure(name, lambda: blockfft_conv.fftconv_bwd(dy, u, k, D, tuning=tuning), check=False,
                    floor=floor_fb_ms - floor_ms)
        del ut, kt, Dt, dy
        del u, k, D, want
        torch.cuda.empty_cache()

    print(f"\n# {header['device']}, copy {bandwidth / 1e12:.2f} TB/s, B={B}, H={H}, bf16 u, fp32 k; "
          f"{time.time() - started:.0f} s (x floor: against the fwd or fwd+bwd floor)")
    print(f"{'L':>6} {'name':60s} {'ms':>8} {'x floor':>8} {'rel err':>9}")
    for r in rows:
        ms = f"{r['ms']:.4f}" if "ms" in r else r.get("error", "")[:40]
        ratio = f"{r['x_floor']:.1f}" if "x_floor" in r else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['L']:>6} {r['name'][:60]:60s} {ms:>8} {ratio:>8} {err:>9}")


if __name__ == "__main__":
    main()
