"""Why a compiled training step's gradients differ from eager ones (GPU machine): the same
(u, k, D) and dy through (a) the eager fast path (``lcconv_compile.fftconv``), (b) the op
(``torch.ops.lcconv.fftconv``, autograd through the op), (c) the family's kernels called
directly, (d) ``torch.compile``; prints the relative difference of every gradient against (c),
and which pairs are bit-identical. Run with LCCONV_DIRECT_LAUNCH=0 to take the direct launcher out.

    python scripts/diagnose_compiled_eager.py [--shape 3 4 1000 600]
"""

from __future__ import annotations

import argparse

import torch

import lcconv_compile
from lcconv_compile import kernels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=4, default=[3, 4, 1000, 600], metavar=("B", "H", "L", "Lk"))
    args = parser.parse_args()
    B, H, L, Lk = args.shape
    torch.manual_seed(0)
    u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = (torch.randn(H, Lk, device="cuda") / Lk ** 0.5).requires_grad_()
    D = torch.randn(H, device="cuda", requires_grad=True)
    dy = torch.randn_like(u)
    family = kernels.select(u, k)
    print("family", family.__name__ if family else None)

    def grads(fn):
        return torch.autograd.grad(fn(u, k, D), (u, k, D), dy)

    runs = {
        "fast_path": grads(lambda u, k, D: lcconv_compile.fftconv(u, k, D)),
        "op": grads(lambda u, k, D: torch.ops.lcconv.fftconv(u, k, D)),
        "compiled": grads(torch.compile(lambda u, k, D: lcconv_compile.fftconv(u, k, D))),
    }
    direct = family.fftconv_bwd(dy, u.detach(), k.detach(), D.detach())[:3]
    for name, got in runs.items():
        parts = []
        for g_name, g, w in zip(("du", "dk", "dD"), got, direct):
            rel = ((g.double() - w.double()).norm() / w.double().norm()).item()
            parts.append(f"{g_name} {'identical' if torch.equal(g, w) else f'rel {rel:.2e}'}")
        print(f"{name:>10} vs kernels directly: " + ", ".join(parts))


if __name__ == "__main__":
    main()
