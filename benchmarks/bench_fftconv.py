"""Op-level benchmark of ``lcconv::fftconv`` on a GPU: ours vs torch.fft (eager and compiled),
SDPA causal attention and the memory floor. Prints a table and writes JSON.

    python benchmarks/bench_fftconv.py --out results.json [--lengths 1024 4096] [--dtypes bf16]

Shapes: B=8, H=1024 (issue 3); u in the given dtype, k and D in float32. The memory floor is
(bytes that must be read + written) / the device-to-device copy bandwidth measured in the same
run; forward+backward adds reading dy, u, k and writing du, dk. Times are medians of
``triton.testing.do_bench`` (CUDA events) after warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton

import lcconv_compile  # noqa: F401  (registers the op)
from lcconv_compile.kernels import flashconv

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def torch_fft_conv(u, k, D):
    """The idiom people write by hand (the eager baseline)."""
    L = u.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return (y + u.float() * D.unsqueeze(-1)).to(u.dtype)


def ours(u, k, D):
    return torch.ops.lcconv.fftconv(u, k, D)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(256 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def bench(fn, backward: bool, inputs, grad):
    if backward:
        def step():
            y = fn(*inputs)
            torch.autograd.grad(y, [t for t in inputs if t.requires_grad], grad)
    else:
        def step():
            with torch.no_grad():
                fn(*inputs)
    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def run(lengths, dtypes, batch, channels, with_compile, device="cuda"):
    bandwidth = copy_bandwidth(device)
    print(f"# device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    rows = []
    compiled_ref = torch.compile(torch_fft_conv, dynamic=False) if with_compile else None
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for L in lengths:
            b = batch if L <= 16384 else max(1, batch // 4)
            u = torch.randn(b, channels, L, device=device, dtype=dtype)
            k = torch.randn(channels, L, device=device) / math.sqrt(L)
            D = torch.randn(channels, device=device)
            grad = torch.randn_like(u)
            q = torch.randn(b, 16, L, 64, device=device, dtype=dtype)
            for backward in (False, True):
                for t in (u, k, D, q):
                    t.requires_grad_(backward)
                fwd_bytes = u.numel() * u.element_size() * 2 + k.numel() * 4 + D.numel() * 4
                floor_bytes = fwd_bytes * (2 if backward else 1)  # bwd: read dy, u, k; write du, dk
                row = dict(L=L, B=b, H=channels, dtype=dtype_name, pass_="fwd+bwd" if backward else "fwd",
                           floor_ms=floor_bytes / bandwidth * 1e3, single_pass=flashconv.supports(u, k))
                row["ours_ms"] = bench(ours, backward, (u, k, D), grad)
                row["torch_fft_ms"] = bench(torch_fft_conv, backward, (u, k, D), grad)
                if compiled_ref is not None:
                    row["compiled_fft_ms"] = bench(compiled_ref, backward, (u, k, D), grad)
                try:
                    row["sdpa_ms"] = bench(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                                           backward, (q,), torch.randn_like(q))
                except torch.OutOfMemoryError:
                    row["sdpa_ms"] = None
                rows.append(row)
                print_row(row)
                sys.stdout.flush()
            del u, k, D, grad, q
            torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_bandwidth_Bps=bandwidth, rows=rows)


HEADER = (f"{'L':>6} {'dtype':>5} {'pass':>8} {'ours':>8} {'fft':>8} {'compiled':>8} {'sdpa':>8} "
          f"{'floor':>7} | {'fft/ours':>8} {'cmp/ours':>8} {'sdpa/ours':>9} {'ours/floor':>10}")


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-".rjust(len(format(1.0, spec)))


def print_row(r):
    ours_ms = r["ours_ms"]
    ratio = lambda key: r[key] / ours_ms if r.get(key) else None  # noqa: E731
    print(f"{r['L']:>6} {r['dtype']:>5} {r['pass_']:>8} {ours_ms:8.3f} {r['torch_fft_ms']:8.3f} "
          f"{_fmt(r.get('compiled_fft_ms'), '8.3f')} {_fmt(r.get('sdpa_ms'), '8.3f')} {r['floor_ms']:7.3f} | "
          f"{_fmt(ratio('torch_fft_ms'), '8.2f')} {_fmt(ratio('compiled_fft_ms'), '8.2f')} "
          f"{_fmt(ratio('sdpa_ms'), '9.2f')} {ours_ms / r['floor_ms']:10.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the baseline")
    parser.add_argument("--out", default="bench_fftconv.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fftconv needs a CUDA GPU")
    print(HEADER)
    result = run(args.lengths, args.dtypes, args.batch, args.channels, not args.no_compile)
    print("\n" + HEADER)
    for r in result["rows"]:
        print_row(r)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
