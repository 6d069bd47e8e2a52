"""benchmarks/bench_fftconv.py's peer rows (issue 22) on CPU: without peers-build/ they load nothing;
with stand-ins for the peers (FlashFFTConv's call, and ThunderKittens' fftconv_pc.cu kernel as its
consumer::compute does the math on the host-made factors) the wiring gives the conv it claims."""

import importlib.util
import math
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # its `from common import ...`
    try:
        path = os.path.join(ROOT, "benchmarks", "bench_fftconv.py")
        spec = importlib.util.spec_from_file_location("bench_fftconv", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    module.bench = lambda fn, backward, inputs, grad: 1.0  # triton's do_bench needs CUDA events
    return module


def tk_kernel(x, kf_r, kf_i, f_r, f_i, finv_r, finv_i, tw_r, tw_i, twinv_r, twinv_i, B, H, N, n):
    """fftconv_pc.cu in fp64: 64x64 tiles (for N = 1024, 2x2 sequences of 32x32 each, batch d at
    block ((d % 4) // 2, d % 2)); X = F X, * tw, @ F, * kf, @ Finv, * twinv, Re(Finv X)."""
    assert x.shape == (B, H, n, n) and x.dtype == torch.bfloat16 and f_r.shape == (64, 64)
    c = lambda re, im: torch.complex(re.double(), im.double())  # noqa: E731
    kf, f, finv, tw, twinv = c(kf_r, kf_i), c(f_r, f_i), c(finv_r, finv_i), c(tw_r, tw_i), c(twinv_r, twinv_i)
    per = 64 // n
    tiles = torch.zeros(-(-B // per**2), H, 64, 64, dtype=torch.complex128)
    blocks = [(d // per**2, (d % per**2) // per * n, d % per * n) for d in range(B)]
    for d, (t, r, col) in enumerate(blocks):
        tiles[t, :, r:r + n, col:col + n] = x[d].double()
    y = (finv @ (((f @ tiles * tw) @ f * kf) @ finv * twinv)).real
    return torch.stack([y[t, :, r:r + n, col:col + n] for t, r, col in blocks]).to(torch.bfloat16)


def test_no_peers_loads_nothing(bench, tmp_path, capsys):
    assert bench.load_peers(str(tmp_path / "peers-build")) == {}
    out = capsys.readouterr().out
    assert "peer thunderkittens skipped" in out


@pytest.mark.parametrize("N", [1024, 4096])
def test_tk_factors_make_the_circular_conv(bench, N):
    B, H = 8, 3
    u, k = torch.randn(B, H, N).bfloat16(), torch.randn(H, N) / math.sqrt(N)
    y = tk_kernel(u.view(B, H, math.isqrt(N), -1), *bench.tk_factors(k, N), B, H, N, math.isqrt(N)).view(B, H, N)
    ref = bench._reference(u, k, N)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("L", [512, 1024, 2048, 256])
def test_peer_columns(bench, L, capsys):
    B, H = 4, 2
    u, k = torch.randn(B, H, L).bfloat16(), torch.randn(H, L) / math.sqrt(L)

    class FakeFlashFFTConv(torch.nn.Module):  # its call: (u, k) -> the first L of the size-seqlen conv
        def __init__(self, seqlen, dtype):
            super().__init__()
            self.n = seqlen

        def forward(self, u, k):
            return torch.fft.irfft(torch.fft.rfft(u.float(), n=self.n) * torch.fft.rfft(k, n=self.n),
                                   n=self.n)[..., :u.shape[-1]].to(u.dtype)

    tk = types.SimpleNamespace(fftconv=tk_kernel)
    ffc = bench.peer_columns("flashfftconv", FakeFlashFFTConv, True, u, k, torch.randn_like(u))
    assert ffc["flashfftconv_mode"] == "causal N=2L" and ffc["flashfftconv_relerr"] < 1e-2, ffc
    cols = bench.peer_columns("thunderkittens", tk, False, u, k, None)
    if L in (512, 2048):
        assert cols["thunderkittens_mode"] == "causal N=2L" and cols["thunderkittens_relerr"] < 2e-2, cols
    elif L == 1024:
        assert cols["thunderkittens_mode"] == "circular N=L" and cols["thunderkittens_relerr"] < 2e-2, cols
    else:
        assert cols == {"thunderkittens_skip": "only N in (1024, 4096)"}
    assert bench.peer_columns("thunderkittens", tk, True, u, k, None) == {"thunderkittens_skip": "no backward"}
    bench.print_peer_row(dict(ours_ms=0.5, **ffc, **cols), {"flashfftconv": None, "thunderkittens": None})
    printed = capsys.readouterr().out
    assert "flashfftconv: 1.000 ms, ours/peer 0.50, rel err" in printed and "thunderkittens: " in printed, printed
    assert bench.peer_columns("flashfftconv", FakeFlashFFTConv, False, u.float(), k, None) == {
        "flashfftconv_skip": "bf16 only"}
