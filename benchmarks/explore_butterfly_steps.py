"""FlashButterfly's exact steps 1 and 3 (kernels/butterfly_steps.py) alone, per tiling: time and the
fraction of the copy bandwidth their own traffic reaches (GPU machine). Says whether a step is
memory- or latency-bound and which tiling to make the default.

    python benchmarks/explore_butterfly_steps.py [--shapes 2x1024x65536 ...] [--out explore_butterfly_steps.json]
"""

from __future__ import annotations

import argparse

import torch
import triton

from common import copy_bandwidth, write_results  # noqa: E402  (this folder)
from lcconv_compile.kernels import butterfly_steps, flashbutterfly as fb

TILINGS = [  # (block_n, rows_per_program, num_warps); None = the default
    (None, None, None), (None, 8, None), (None, 16, None), (64, 8, None), (128, 8, 8), (256, 8, 8),
]
# The two-level kernels (N1 >= 256) hold all N1 rows of a column block: fewer columns per program.
TWO_LEVEL_TILINGS = [
    (None, None, None), (4, None, None), (8, None, None), (16, None, None), (32, None, None),
    (None, 8, None), (None, 2, None), (None, None, 4), (None, None, 16),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+",
                        default=["2x1024x65536", "1x256x262144", "1x64x1048576", "1x16x4194304"])
    parser.add_argument("--out", default="explore_butterfly_steps.json")
    args = parser.parse_args()
    bandwidth = copy_bandwidth("cuda")
    rows_out = []
    for spec in args.shapes:
        B, H, L = (int(v) for v in spec.split("x"))
        n1, n2 = fb.split_for(L, L, torch.bfloat16)
        u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(B, H, n1, n2, 2, device="cuda", dtype=torch.float16)
        z_bytes, u_bytes = z.numel() * 2, u.numel() * 2
        for block_n, rpp, warps in (TWO_LEVEL_TILINGS if butterfly_steps.two_level(n1, n2) else TILINGS):
            if block_n is not None and block_n > n2:
                continue
            tiles = dict(block_n=block_n, rows_per_program=rpp, num_warps=warps)
            cases = {
                "step1": (lambda: butterfly_steps.step1(u, (n1, n2), torch.float16, **tiles), u_bytes + z_bytes),
                "step3": (lambda: butterfly_steps.step3(z, L, torch.bfloat16, scale=1 / n1, **tiles), z_bytes + u_bytes),
            }
            for name, (fn, traffic) in cases.items():
                try:
                    ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
                except Exception as err:  # a tiling that does not compile: report and go on
                    print(f"{spec} {name} {tiles}: {type(err).__name__} {str(err)[:120]}")
                    continue
                floor_ms = traffic / bandwidth * 1e3
                row = dict(shape=[B, H, L], split=[n1, n2], step=name, tiles=tiles,
                           blocks=list(butterfly_steps.blocks_for(n1, n2, "fp16", block_n, rpp, warps)),
                           ms=ms, floor_ms=floor_ms)
                rows_out.append(row)
                print(f"{spec:>14} ({n1},{n2}) {name} blocks={row['blocks']}: {ms:7.3f} ms, "
                      f"{ms / floor_ms:5.2f}x its traffic floor ({floor_ms:.3f})", flush=True)
        del u, z
        torch.cuda.empty_cache()
    write_results(args.out, dict(copy_bandwidth_Bps=bandwidth, rows=rows_out))
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
