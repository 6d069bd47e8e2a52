"""The op at H3's shapes alone (GPU machine): why the convolution costs more inside the H3 LM step
than in bench_fftconv's table. Times forward and forward+backward of ``lcconv_compile.fftconv``
at (B, 768, L) bf16 (B*L = 32K, the LM benchmark's tokens) through autograd, plain and with H3's
gates and skip, each with contiguous (B, H, L) tensors and with transposed views of (B, L, H) ones
(the layout of nn.Linear outputs). Prints a table; ``--out`` writes JSON. (Commit 4ec9557's version
also timed the output gate kept apart from the differentiated call; see NOTES, stop 12.)

    python benchmarks/probe_h3_conv.py [--lengths 2048 8192] [--out probe.json]

Measures and reports; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402  (this folder)
from lcconv_compile import fftconv, kernels  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for L in args.lengths:
        B, H = args.tokens // L, args.channels
        k = (torch.randn(H, L, device="cuda") / L ** 0.5).requires_grad_(True)
        D = torch.randn(H, device="cuda", requires_grad=True)
        for layout in ("BHL", "BLH"):
            # BHL: contiguous (B, H, L) tensors. BLH: transposed views of (B, L, H) tensors, as
            # nn.Linear's output seen through .transpose(1, 2) (L stride = H), for u, both gates
            # and the output gradient (what stop 11's H3 passed the op).
            def tensor():
                t = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
                return t if layout == "BHL" else t.transpose(1, 2).contiguous().transpose(1, 2)
            u, q, g = (tensor().requires_grad_(True) for _ in range(3))
            dy = tensor()
            family = kernels.select(u, k)
            cases = {"plain": {}, "gates+D": dict(D=D, gate_in=g, gate_out=q)}
            for name, opts in cases.items():

                def fwd():
                    return fftconv(u, k, **opts)

                def fwd_bwd():
                    fftconv(u, k, **opts).backward(dy)

                ms_f = triton.testing.do_bench(fwd, warmup=5, rep=50, return_mode="median")
                ms_fb = triton.testing.do_bench(fwd_bwd, warmup=5, rep=50, return_mode="median")
                row = dict(shape=[B, H, L], layout=layout, case=name,
                           family=getattr(family, "__name__", None), fwd_ms=ms_f, fwd_bwd_ms=ms_fb)
                rows.append(row)
                print(f"({B},{H},{L}) {layout} {name:8s} {row['family']}: fwd {ms_f:.3f} ms, "
                      f"fwd+bwd {ms_fb:.3f} ms", flush=True)
    if args.out:
        write_results(args.out, dict(rows=rows))


if __name__ == "__main__":
    main()
