"""FlashConv v6 forward (kernels/monarch_conv.py, Gluon) on the GPU against v5 (the dispatched
family), torch.fft and the memory floor, with its tensor-core rate.

    python benchmarks/explore_monarch_conv.py --out explore_monarch_conv.json [--lengths 1024 2048 4096]

Shapes: B=8, H=1024, u bf16, k and D float32; forward, and the backward alone (du's error shown;
kernels called directly). Beside the dispatched forward: each of monarch_conv.CANDIDATE_TUNINGS,
and the probes (monarch_conv.PROBES: variants that skip a stage, wrong results by design, their
error not checked) on the dispatched tuning and the first candidate, which say what bounds it. The floor (both) is the forward's: (u read + k read + y write) / the
device-to-device copy bandwidth of the same run; TFLOP/s
counts v6's tensor-core work (monarch_plan: per row pair plus k's spectrum per channel). Medians
of ``triton.testing.do_bench``; the JSON is rewritten after every row, so a run cut short keeps
what it measured. The GPU tests (tests/test_kernels_monarch_conv.py) check v6's results; this
script reports each row's error against float64 too, so a wrong kernel is never timed unnoticed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import torch
import triton

from common import copy_bandwidth, run_metadata, write_results  # this folder
from explore_blockfft_conv import torch_fft_conv
from lcconv_compile import reference
from lcconv_compile.kernels import blockfft_conv, monarch_conv, monarch_plan


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--out", default="explore_monarch_conv.json")
    args = parser.parse_args()
    B, H = args.batch, args.channels
    bandwidth = copy_bandwidth("cuda")
    meta = run_metadata()
    header = dict(copy_bandwidth_tb_s=bandwidth / 1e12, batch=B, channels=H)
    print(meta, header, flush=True)
    rows = []
    for L in args.lengths:
        u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(H, L, device="cuda") / math.sqrt(L)
        D = torch.randn(H, device="cuda")
        want = reference.fftconv_ref(u.double(), k.double(), D.double())
        floor_ms = (2 * u.numel() * 2 + k.numel() * 4) / bandwidth * 1e3
        plan = monarch_plan.plan_for(L)
        flops = plan.flops_per_pair() * triton.cdiv(B, 2) * H + plan.flops_per_kernel_spectrum() * H
        dy = torch.randn_like(u)
        want_du = reference.fftconv_bwd_ref(dy.double(), u.double(), k.double(), D.double()).du
        runs = [("torch.fft", lambda: torch_fft_conv(u, k, D), want),
                ("v5 (blockfft_conv)", lambda: blockfft_conv.fftconv_fwd(u, k, D), want),
                (f"v6 (monarch_conv) {monarch_conv.forward_tuning(plan)}", lambda: monarch_conv.fftconv_fwd(u, k, D),
                 want),
                ("v5 backward", lambda: blockfft_conv.fftconv_bwd(dy, u, k, D)[0], want_du)]
        if monarch_conv.backward_supported(L):
            runs.append(("v6 backward", lambda: monarch_conv.gluon_fftconv_bwd(dy, u, k, D)[0], want_du))
        base = monarch_conv.forward_tuning(plan)
        candidates = monarch_conv.CANDIDATE_TUNINGS[plan.n2]
        for tuning in candidates:
            runs.append((f"v6 {tuning}", functools.partial(monarch_conv.fftconv_fwd, u, k, D, tuning=tuning), want))
        for tuning in (base, *candidates[:1]):
            for probe in sorted(monarch_conv.PROBES)[1:]:
                probed = dataclasses.replace(tuning, probe=probe)
                runs.append((f"v6 probe {probe} ({monarch_conv.PROBES[probe]}) {probed}",
                             functools.partial(monarch_conv.fftconv_fwd, u, k, D, tuning=probed), None))
        for name, fn, ref in runs:
            row = dict(L=L, name=name, floor_ms=floor_ms)
            try:
                y = fn()
                if ref is not None:
                    row["rel_err"] = ((y.double() - ref).norm() / ref.norm()).item()
                row["ms"] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                row["x_floor"] = row["ms"] / floor_ms
                if name.startswith("v6") and "backward" not in name and "probe" not in name:
                    row.update(plan=f"{plan.n1}x{plan.n2}", tflops=flops / row["ms"] / 1e9)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next row
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            print("  ", {n: (round(v, 5) if isinstance(v, float) else v) for n, v in row.items()}, flush=True)
            write_results(args.out, dict(header, rows=rows), meta)


if __name__ == "__main__":
    main()
