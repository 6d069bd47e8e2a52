"""Op-level benchmark of ``lcconv::fftconv`` on a GPU: ours vs torch.fft (eager and compiled),
SDPA causal attention and the memory floor; and a host-overhead table. Prints tables and writes JSON.

    python benchmarks/bench_fftconv.py --out results.json [--tables ops host] [--lengths 1024 4096]
    python benchmarks/bench_fftconv.py --tables long --out long.json [--long-dtypes bf16 fp32]
    python benchmarks/bench_fftconv.py --tables lengths --out lengths.json   # then plot_lengths.py

Long table (``--tables long``, FlashButterfly): (4,1024,32K), (2,1024,64K), (1,256,256K), (1,64,1M),
(1,16,4M), Lk = L, k and D float32: ours (the op; ``family`` says which kernels ran it,
"reference" = torch.fft inside the op), the hand-written torch.fft idiom, the memory floor, and
the learned-butterfly op at the exact factors where its kernels cover the split; forward and
forward+backward; ``*_peak_x`` = peak memory of one step above its inputs, as a multiple of u's
bytes (:func:`common.peak_memory_bytes`).

Lengths table (``--tables lengths``, the README plot): L = 1K..4M at a constant B*H*L = 2^26
samples ((1, 2^26 / L, L), bf16, Lk = L): ours (the op as dispatched by default), torch.fft and
the floor, forward and forward+backward; ``benchmarks/plot_lengths.py`` draws it.

Host-overhead table (``--tables host``): at (2, 4, 1K) and (8, 1024, 1K) bf16, plain
(``fftconv(u, k, D)``), gated (``gate_in=g, gate_out=g``) and ``torch_mul`` (``u * 2``, no op of
ours: the control), forward and forward+backward, for eager, ``torch.compile`` (default) and
``mode="reduce-overhead"`` (``--host-modes`` adds ``reduce-overhead-static``: the inputs marked
with ``torch._dynamo.mark_static_address``); ``copy_us`` = GPU us per call in copies (profiler; CUDA
graph trees copy inputs that are not static into the graph's buffers before each replay):
``host_us`` = host time to issue one call (many calls back to back, timed before the single
synchronisation), ``wall_us`` = the same including it (what a training loop sees), ``gpu_us`` =
GPU time of one call (CUDA events around a CUDA-graph replay of it, so host gaps do not count;
plain CUDA events where capture fails). wall/gpu near 1 means the GPU is kept busy.

Peer rows (``--tables ops``, issue 22): FlashFFTConv and ThunderKittens' fftconv, timed in the
same run on the same inputs where ``scripts/peers.sh build`` left them importable in peers-build/
(``PEERS_BUILD``); otherwise one "skipped" line and nothing else changes (see ``load_peers``).

Shapes: B=8, H=1024 (issue 3); u in the given dtype, k and D in float32. The memory floor is
(bytes that must be read + written) / the device-to-device copy bandwidth measured in the same
run; forward+backward adds reading dy, u, k and writing du, dk. Times are medians of
``triton.testing.do_bench`` (CUDA events) after warm-up.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

from torch._dynamo.utils import counters

import lcconv_compile  # noqa: F401  (registers the op)
from common import copy_bandwidth, peak_memory_bytes, write_results  # noqa: E402  (this folder)
from lcconv_compile import kernels, reference
from lcconv_compile.kernels import flashbutterfly

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def torch_fft_conv(u, k, D):
    """The idiom people write by hand (the eager baseline)."""
    L = u.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return (y + u.float() * D.unsqueeze(-1)).to(u.dtype)


def family_name(u, k) -> str:
    """The kernel family kernels.select picks for these inputs ("reference" if none)."""
    family = kernels.select(u, k)
    return family.__name__.rsplit(".", 1)[-1] if family is not None else "reference"


def ours(u, k, D):
    return torch.ops.lcconv.fftconv(u, k, D)


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


def run(lengths, dtypes, batch, channels, with_compile, device="cuda", peers=None):
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
                           floor_ms=floor_bytes / bandwidth * 1e3, kernel_family=family_name(u, k))
                row["ours_ms"] = bench(ours, backward, (u, k, D), grad)
                row["torch_fft_ms"] = bench(torch_fft_conv, backward, (u, k, D), grad)
                if compiled_ref is not None:
                    row["compiled_fft_ms"] = bench(compiled_ref, backward, (u, k, D), grad)
                try:
                    row["sdpa_ms"] = bench(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                                           backward, (q,), torch.randn_like(q))
                except torch.OutOfMemoryError:
                    row["sdpa_ms"] = None
                for name, peer in (peers or {}).items():
                    row.update(peer_columns(name, peer, backward, u.detach(), k.detach(), grad))
                rows.append(row)
                print_row(row)
                print_peer_row(row, peers)
                sys.stdout.flush()
            del u, k, D, grad, q
            torch.cuda.empty_cache()
    return dict(copy_bandwidth_Bps=bandwidth, rows=rows)


# ------------------------------------------------------------------------------------- peers --
# Optional rows for the peers scripts/peers.sh builds into peers-build/ (issue 22), on the ops
# table's inputs; columns <peer>_ms, <peer>_relerr (the peer's output against an fp64 torch.fft
# reference of the op it computes, so a mis-wired peer shows), <peer>_mode, or <peer>_skip (why).
#   flashfftconv: FlashFFTConv(2L, bf16)(u, k), u (B,H,L) bf16 and k (H,L) fp32 as it expects: the
#     causal conv through its implicit zero padding (FFT size 2L: a power of two, 256 .. 4M; bf16 or
#     fp16 only, so no fp32 rows); fwd and fwd+bwd (du, dk). k's FFT is inside its call, as inside
#     ours. It has no D: ours adds u * D in its kernel, the peer's time leaves it out (favours it).
#   thunderkittens: kernels/fftconv/fftconv_pc.cu, a bf16 circular conv of size N in {1024, 4096},
#     forward only; k's spectrum and the Monarch factors are made once outside the timing, as in
#     TK's own harness. Where 2L is such an N (mode "causal N=2L"): u zero-padded to 2L beforehand
#     (not timed) and y = its first L outputs, the same causal conv as ours at the FLOPs of an FFT
#     of size 2L, reading and writing 2L samples per row (ours: L): the fair comparison. Where L is
#     such an N (mode "circular N=L"): TK at its own size on unpadded u, which is NOT the causal conv
#     (it wraps around): TK's speed at that length, checked against the circular reference. Its
#     132 persistent blocks take heads 0..131 first; thunderkittens_relerr_h132 is the error over
#     those alone. (At N = 1024 the kernel's consumers count iterations per head differently from
#     its producer, fftconv_pc.cu: ceil(B/2) against ceil(B/8), so for B > 2 the heads after 131
#     may get another head's filter: a large relerr with a small relerr_h132 is that.)
PEERS_BUILD = os.environ.get("PEERS_BUILD", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         "peers-build"))
TK_SIZES = (1024, 4096)


def load_peers(build=PEERS_BUILD) -> dict:
    """{"flashfftconv": its FlashFFTConv class, "thunderkittens": the tk_fftconv module}, for those
    that import from ``build`` (or from the environment); prints one line for each that does not."""
    peers = {}
    if os.path.isdir(os.path.join(build, "site")) and os.path.join(build, "site") not in sys.path:
        sys.path.append(os.path.join(build, "site"))
    try:
        from flashfftconv import FlashFFTConv
        peers["flashfftconv"] = FlashFFTConv
    except Exception as exc:  # ImportError, or a .so built for another torch
        print(f"# peer flashfftconv skipped: {type(exc).__name__}: {exc} (scripts/peers.sh)")
    try:
        path = (glob.glob(os.path.join(build, "tk", "tk_fftconv*.so")) or [None])[0]
        if path is None:
            raise ImportError(f"no {build}/tk/tk_fftconv*.so")
        spec = importlib.util.spec_from_file_location("tk_fftconv", path)
        peers["thunderkittens"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peers["thunderkittens"])
    except Exception as exc:
        peers.pop("thunderkittens", None)
        print(f"# peer thunderkittens skipped: {type(exc).__name__}: {exc} (scripts/peers.sh)")
    return peers


def tk_factors(k, N):
    """fftconv_pc.cu's host-side inputs for size N (as TK's baselines/tk_fftconv.py makes them), as
    (real, imag) bf16 pairs of 64x64 matrices: per head the filter spectrum fft(k, N) as an (n, n)
    matrix (n = sqrt(N)) transposed, the DFT matrix of size n, its inverse, the twiddles / N and the
    inverse twiddles. For N = 1024 the kernel packs 2x2 sequences in a 64x64 tile: the DFT matrices
    block-diagonal, the others tiled 2x2."""
    n = math.isqrt(N)
    i = torch.arange(n, dtype=torch.float64, device=k.device)
    dft = torch.exp(-2j * math.pi * torch.outer(i, i) / n)
    tw = torch.exp(-2j * math.pi * torch.outer(i, i) / N)
    kf = torch.fft.fft(k.double(), n=N).reshape(-1, n, n).transpose(-1, -2)
    mats = [kf, dft, dft.conj(), tw / N, tw.conj()]
    if n == 32:
        mats = [kf.repeat(1, 2, 2), torch.block_diag(dft, dft), torch.block_diag(dft.conj(), dft.conj()),
                (tw / N).repeat(2, 2), tw.conj().repeat(2, 2)]
    return [part.to(torch.bfloat16).contiguous() for m in mats for part in (m.real, m.imag)]


def _reference(u, k, n):
    """fp64 torch.fft reference: the first L outputs of the size-n circular conv (n = 2L: causal)."""
    L = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u.double(), n=n) * torch.fft.rfft(k.double(), n=n), n=n)[..., :L]


def _peer_call(name, peer, u, k):
    """(call taking (u, k), FFT size, mode) of one peer at u's length, or a string saying why not."""
    B, H, L = u.shape
    if u.dtype != torch.bfloat16:
        return "bf16 only"
    if name == "flashfftconv":
        try:
            conv = peer(2 * L, dtype=torch.bfloat16).to(u.device)
        except NotImplementedError:
            return f"no FFT size {2 * L}"
        return (lambda u, k: conv(u, k)), 2 * L, "causal N=2L"
    N, mode = (2 * L, "causal N=2L") if 2 * L in TK_SIZES else (L, "circular N=L") if L in TK_SIZES else (0, "")
    if not N:
        return f"only N in {TK_SIZES}"
    n, factors = math.isqrt(N), tk_factors(k, N)
    x = (F.pad(u, (0, N - L)) if N != L else u).reshape(B, H, n, n).contiguous()  # padded once, not timed

    def call(u, k):  # u and k are in x and factors already
        return peer.fftconv(x, *factors, B, H, N, n).view(B, H, N)[..., :L]
    return call, N, mode


def peer_columns(name, peer, backward, u, k, grad) -> dict:
    """One peer's columns for an ops-table row (see the comment above)."""
    if backward and name == "thunderkittens":
        return {f"{name}_skip": "no backward"}
    try:
        made = _peer_call(name, peer, u, k)
        if isinstance(made, str):
            return {f"{name}_skip": made}
        call, N, mode = made
        with torch.no_grad():
            y = call(u, k).double()
        ref = _reference(u, k, N)
        out = {f"{name}_mode": mode, f"{name}_relerr": ((y - ref).norm() / ref.norm()).item()}
        if name == "thunderkittens":
            out[f"{name}_relerr_h132"] = ((y - ref)[:, :132].norm() / ref[:, :132].norm()).item()
        u, k = u.clone().requires_grad_(backward), k.clone().requires_grad_(backward)
        out[f"{name}_ms"] = bench(call, backward, (u, k), grad)
        return out
    except Exception as exc:  # report and go on: a peer that fails must not end the table
        return {f"{name}_skip": f"{type(exc).__name__}: {str(exc)[:200]}"}


def print_peer_row(r, peers):
    for name in peers or {}:
        if f"{name}_ms" in r:
            h132 = f" (heads < 132: {r[name + '_relerr_h132']:.1e})" if name + "_relerr_h132" in r else ""
            print(f"{'':>6} {'':>5} {'':>8}   {name}: {r[name + '_ms']:.3f} ms, ours/peer "
                  f"{r['ours_ms'] / r[name + '_ms']:.2f}, rel err {r[name + '_relerr']:.1e}{h132}"
                  f" ({r[name + '_mode']})")
        else:
            print(f"{'':>6} {'':>5} {'':>8}   {name}: skipped: {r.get(name + '_skip')}")


# ------------------------------------------------------------------------------ long lengths --
LONG_SHAPES = ((4, 1024, 1 << 15), (2, 1024, 1 << 16), (1, 256, 1 << 18), (1, 64, 1 << 20), (1, 16, 1 << 22))


def _inputs(b, h, L, dtype, device):
    """(u, k, D, dy) of one benchmark shape: u and dy in ``dtype``, k and D float32, Lk = L."""
    u = torch.randn(b, h, L, device=device, dtype=dtype)
    return u, torch.randn(h, L, device=device) / math.sqrt(L), torch.randn(h, device=device), torch.randn_like(u)


def _step(fn, backward, inputs, grad):
    if backward:
        return lambda: torch.autograd.grad(fn(*inputs), [t for t in inputs if t.requires_grad], grad)

    def forward():
        with torch.no_grad():
            fn(*inputs)
    return forward


def run_long(dtypes, shapes=LONG_SHAPES, device="cuda"):
    """The long-length table (see the module docstring). FlashButterfly runs as "ours" at every
    length it covers, also past flashbutterfly.DISPATCH_MAX_N1 (lifted here; each row says which
    family ran and whether the op would dispatch it by default: "dispatched")."""
    saved = flashbutterfly.DISPATCH_MAX_N1, flashbutterfly.DISPATCH_DTYPES
    try:
        flashbutterfly.DISPATCH_MAX_N1, flashbutterfly.DISPATCH_DTYPES = 1 << 30, flashbutterfly.KERNEL_DTYPES
        return _run_long(dtypes, shapes, device, saved)
    finally:
        flashbutterfly.DISPATCH_MAX_N1, flashbutterfly.DISPATCH_DTYPES = saved


def _run_long(dtypes, shapes, device, dispatch_rule):
    bandwidth = copy_bandwidth(device)
    print(f"# device {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(LONG_HEADER)
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for b, h, L in shapes:
            u, k, D, grad = _inputs(b, h, L, dtype, device)
            n = reference.fft_size(L, L)
            learned = None
            if flashbutterfly.split_compiles(dtype, *reference.butterfly_split(n), learned=True):
                factors = reference.butterfly_exact_factors(n, torch.float32, device)

                def learned(u, k, D, factors=factors):
                    return torch.ops.lcconv.butterfly_conv(u, k, *factors, D)
            for backward in (False, True):
                for t in (u, k, D):
                    t.requires_grad_(backward)
                fwd_bytes = u.numel() * u.element_size() * 2 + k.numel() * 4 + D.numel() * 4
                floor_bytes = fwd_bytes * (2 if backward else 1)
                row = dict(B=b, H=h, L=L, dtype=dtype_name, pass_="fwd+bwd" if backward else "fwd",
                           floor_ms=floor_bytes / bandwidth * 1e3, family=family_name(u, k),
                           dispatched=(dtype in dispatch_rule[1]
                                       and flashbutterfly.split_for(L, L, dtype)[0] <= dispatch_rule[0]))
                candidates = dict(ours=ours, torch_fft=torch_fft_conv, learned=learned)
                for name, fn in candidates.items():
                    if fn is None:
                        row[f"{name}_ms"] = row[f"{name}_peak_x"] = None
                        continue
                    try:
                        step = _step(fn, backward, (u, k, D), grad)
                        row[f"{name}_peak_x"] = peak_memory_bytes(step) / (u.numel() * u.element_size())
                        row[f"{name}_ms"] = triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median")
                    except torch.OutOfMemoryError:
                        row[f"{name}_ms"] = row[f"{name}_peak_x"] = None
                    torch.cuda.empty_cache()
                rows.append(row)
                print_long_row(row)
                sys.stdout.flush()
            del u, k, D, grad
            torch.cuda.empty_cache()
    return dict(copy_bandwidth_Bps=bandwidth, long_rows=rows)


LONG_HEADER = (f"{'shape':>16} {'dtype':>5} {'pass':>8} {'family':>14} {'ours':>8} {'fft':>8} {'learned':>8} "
               f"{'floor':>7} | {'fft/ours':>8} {'ours/floor':>10} {'lrn/ours':>8} {'peak_x':>6} {'fft_pk':>6}")


def print_long_row(r):
    ours_ms = r["ours_ms"]
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    shape = f"({r['B']},{r['H']},{r['L'] // 1024}K)"
    print(f"{shape:>16} {r['dtype']:>5} {r['pass_']:>8} {r['family']:>14} {_fmt(ours_ms, '8.3f')} "
          f"{_fmt(r['torch_fft_ms'], '8.3f')} {_fmt(r['learned_ms'], '8.3f')} {r['floor_ms']:7.3f} | "
          f"{_fmt(ratio(r['torch_fft_ms'], ours_ms), '8.2f')} {_fmt(ratio(ours_ms, r['floor_ms']), '10.1f')} "
          f"{_fmt(ratio(r['learned_ms'], ours_ms), '8.2f')} {_fmt(r['ours_peak_x'], '6.1f')} "
          f"{_fmt(r['torch_fft_peak_x'], '6.1f')}")


# --------------------------------------------------------------------------------- lengths --
LENGTHS_SAMPLES = 1 << 26


def run_lengths(dtype_name="bf16", device="cuda"):
    """The lengths table (see the module docstring): one row per (L, pass)."""
    bandwidth = copy_bandwidth(device)
    dtype = DTYPES[dtype_name]
    rows = []
    print(f"{'L':>8} {'H':>6} {'pass':>8} {'family':>14} {'ours':>8} {'fft':>8} {'floor':>7} | {'fft/ours':>8}")
    for log_l in range(10, 23):
        L = 1 << log_l
        h = LENGTHS_SAMPLES // L
        u, k, D, grad = _inputs(1, h, L, dtype, device)
        for backward in (False, True):
            for t in (u, k, D):
                t.requires_grad_(backward)
            fwd_bytes = u.numel() * u.element_size() * 2 + k.numel() * 4 + D.numel() * 4
            row = dict(B=1, H=h, L=L, dtype=dtype_name, pass_="fwd+bwd" if backward else "fwd",
                       floor_ms=fwd_bytes * (2 if backward else 1) / bandwidth * 1e3, family=family_name(u, k))
            for name, fn in (("ours", ours), ("torch_fft", torch_fft_conv)):
                try:
                    row[f"{name}_ms"] = triton.testing.do_bench(_step(fn, backward, (u, k, D), grad), warmup=5,
                                                                rep=40, return_mode="median")
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = None
                torch.cuda.empty_cache()
            rows.append(row)
            speedup = row["torch_fft_ms"] / row["ours_ms"] if row["ours_ms"] and row["torch_fft_ms"] else None
            print(f"{L:>8} {h:>6} {row['pass_']:>8} {row['family']:>14} {_fmt(row['ours_ms'], '8.3f')} "
                  f"{_fmt(row['torch_fft_ms'], '8.3f')} {row['floor_ms']:7.3f} | {_fmt(speedup, '8.2f')}", flush=True)
        del u, k, D, grad
        torch.cuda.empty_cache()
    return dict(copy_bandwidth_Bps=bandwidth, length_rows=rows)


# ----------------------------------------------------------------------------- host overhead --
HOST_SHAPES = ((2, 4, 1024), (8, 1024, 1024))
# reduce-overhead-static: the inputs marked static (torch._dynamo.mark_static_address), which should
# let CUDA graph trees read them in place instead of copying them into the graph's own buffers on
# every call (README "CUDA graphs"; not in the default modes: on torch 2.11 the copies stayed).
HOST_MODES = ("eager", "compile", "reduce-overhead", "reduce-overhead-static")
DEFAULT_HOST_MODES = ("eager", "compile", "reduce-overhead")
# plain: fftconv(u, k, D); gated: fftconv(u, k, D, gate_in=g, gate_out=g); torch_mul: u * 2, a
# one-kernel graph without our op, the control for what each mode costs by itself.
HOST_VARIANTS = ("plain", "gated", "torch_mul")
_VARIANT_INPUTS = {"plain": 3, "gated": 4, "torch_mul": 1}  # how many of (u, k, D, g) it reads


def _host_call(variant):
    if variant == "plain":
        return lambda u, k, D, g: torch.ops.lcconv.fftconv(u, k, D)
    if variant == "gated":
        return lambda u, k, D, g: lcconv_compile.fftconv(u, k, D, gate_in=g, gate_out=g)
    return lambda u, k, D, g: u * 2.0


def _host_step(mode, backward, variant, inputs, grad):
    """One call of the op (forward, or forward + backward) as the given mode runs it."""
    call = _host_call(variant)
    conv = call if mode == "eager" else torch.compile(
        call, mode="reduce-overhead" if mode.startswith("reduce-overhead") else None, dynamic=False)
    mark_step = torch.compiler.cudagraph_mark_step_begin if mode.startswith("reduce-overhead") else (lambda: None)
    wrt = [t for t in inputs[:_VARIANT_INPUTS[variant]] if t.requires_grad]
    if backward:
        def step():
            mark_step()
            return torch.autograd.grad(conv(*inputs), wrt, grad)
    else:
        def step():
            mark_step()
            with torch.no_grad():
                return conv(*inputs)
    return step


def _gpu_us(step):
    """GPU time of one call: a CUDA graph of it replayed (no host gaps), else plain CUDA events."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3, "graph"
    except Exception:  # reduce-overhead steps are graphs already; some steps cannot be captured
        torch.cuda.synchronize()
        return triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median") * 1e3, "events"


def host_and_wall_us(step, calls):
    """(host us, wall us) per call of ``step``: issued back to back, one synchronisation at the end."""
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def gpu_kernels_per_call(step, calls=5):
    """{kernel name: (launches per call, GPU us per call)} from the profiler, over ``calls`` calls:
    shows what a mode adds on the GPU (e.g. the input copies of a CUDA-graph replay)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels_seen = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0)
        if device_us and event.count:
            kernels_seen[event.key[:80]] = (event.count / calls, device_us / calls)
    return kernels_seen


def _host_inputs(B, H, L, mode, backward, device):
    u, k, D, grad = _inputs(B, H, L, torch.bfloat16, device)
    g = torch.randn_like(u)
    inputs = (u, k, D, g)
    for t in inputs:
        t.requires_grad_(backward)
        if mode == "reduce-overhead-static":
            torch._dynamo.mark_static_address(t)
    return inputs, grad


def host_overhead(calls=200, device="cuda", modes=DEFAULT_HOST_MODES, variants=HOST_VARIANTS):
    rows = []
    for B, H, L in HOST_SHAPES:
        for variant in variants:
            for backward in (False, True):
                for mode in modes:
                    torch._dynamo.reset()
                    counters.clear()
                    inputs, grad = _host_inputs(B, H, L, mode, backward, device)
                    step = _host_step(mode, backward, variant, inputs, grad)
                    row = dict(B=B, H=H, L=L, dtype="bf16", variant=variant,
                               pass_="fwd+bwd" if backward else "fwd", mode=mode)
                    try:
                        row["host_us"], row["wall_us"] = host_and_wall_us(step, calls)
                        row["gpu_us"], row["gpu_timing"] = _gpu_us(step) if not mode.startswith(
                            "reduce-overhead") else (
                            triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median") * 1e3, "events")
                        row["gpu_kernels"] = gpu_kernels_per_call(step)
                    except Exception as exc:  # report and go on: one broken mode must not hide the rest
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    # Graphs Inductor refused to put in CUDA graphs (reduce-overhead), with its reasons.
                    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
                    rows.append(row)
                    print_host_row(row)
                    sys.stdout.flush()
                    del inputs, grad, step
                    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return rows


def _copy_us(row) -> float:
    """GPU us per call in copies: CUDA graph trees copy non-static inputs with torch._foreach_copy_,
    one multi_tensor_apply kernel when the inputs share a dtype, else a memcpy per input."""
    return sum(us for name, (_, us) in row.get("gpu_kernels", {}).items()
               if any(word in name.lower() for word in ("copy", "memcpy", "multi_tensor_apply")))


HOST_HEADER = (f"{'B,H,L':>14} {'variant':>7} {'pass':>8} {'mode':>22} {'host_us':>8} {'wall_us':>8} "
               f"{'gpu_us':>8} {'wall/gpu':>8} {'copy_us':>8} {'cg_skips':>6}")


def print_host_row(r):
    shape = f"{r['B']},{r['H']},{r['L']}"
    head = f"{shape:>14} {r['variant']:>7} {r['pass_']:>8} {r['mode']:>22}"
    if "error" in r:
        print(f"{head}  error: {r['error']}")
        return
    print(f"{head} {r['host_us']:8.1f} {r['wall_us']:8.1f} {r['gpu_us']:8.1f} {r['wall_us'] / r['gpu_us']:8.2f} "
          f"{_copy_us(r):8.1f} {r['cudagraph_skips']:>6}")


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
    parser.add_argument("--tables", nargs="+", default=["ops", "host"], choices=["ops", "host", "long", "lengths"],
                        help="ops: ours vs baselines per length; host: host overhead (wall vs GPU time); "
                             "long: FlashButterfly's lengths 32K..4M with peak memory; "
                             "lengths: 1K..4M at B*H*L = 2^26 (the README plot)")
    parser.add_argument("--long-dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--long-shapes", nargs="+", default=None,
                        help="long table shapes as BxHxL (default: the five of LONG_SHAPES)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the baseline")
    parser.add_argument("--no-peers", action="store_true", help="no FlashFFTConv / ThunderKittens rows (peers-build/)")
    parser.add_argument("--host-calls", type=int, default=200, help="calls per host-overhead measurement")
    parser.add_argument("--host-modes", nargs="+", default=list(DEFAULT_HOST_MODES), choices=HOST_MODES)
    parser.add_argument("--host-variants", nargs="+", default=list(HOST_VARIANTS), choices=HOST_VARIANTS)
    parser.add_argument("--out", default="bench_fftconv.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fftconv needs a CUDA GPU")
    result = {}
    if "ops" in args.tables:
        peers = {} if args.no_peers else load_peers()
        print(HEADER)
        result.update(run(args.lengths, args.dtypes, args.batch, args.channels, not args.no_compile, peers=peers))
        result["peers"] = sorted(peers)
        print("\n" + HEADER)
        for r in result["rows"]:
            print_row(r)
            print_peer_row(r, peers)
    if "long" in args.tables:
        shapes = (tuple(tuple(int(v) for v in spec.split("x")) for spec in args.long_shapes)
                  if args.long_shapes else LONG_SHAPES)
        result.update(run_long(args.long_dtypes, shapes))
    if "lengths" in args.tables:
        result.update(run_lengths())
    if "host" in args.tables:
        print("\n# host overhead (us per call)\n" + HOST_HEADER)
        result["host_rows"] = host_overhead(args.host_calls, modes=args.host_modes, variants=args.host_variants)
    write_results(args.out, result)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
