"""FlashConv v6 forward (kernels/monarch_conv.py, Gluon). Gluon kernels do not run in Triton's
CPU interpreter: on CPU this file compiles the kernel for sm_90 (no spills, shared memory within
the H100's limit); the kernel's results are tested on a Hopper GPU only (marked cuda), against
the float64 reference with outputs poisoned first, and against the CPU emulation of the same
schedule (kernels/monarch_plan.py), which localises a mismatch to the transcription."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lcconv_compile.kernels import monarch_plan
from lcconv_compile.reference import fftconv_ref

from inputs import as_float64, poisoned, random_args, rel_err

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
requires_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon's wgmma kernel needs a Hopper GPU (sm_90)")


def test_compiles_for_hopper_without_spills():
    """Every plan, every option on: compiled for sm_90 on this machine (Triton's ptxas)."""
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compile_check.py"
    env = dict(os.environ, PYTHONPATH=str(script.parents[1]))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, str(script), "--family", "v6", "--all-options", "--lengths", "1024", "2048",
                          "4096"], capture_output=True, text=True, env=env, timeout=900)
    reports = [line for line in out.stdout.splitlines() if line.strip().startswith("forward")]
    assert out.returncode == 0 and len(reports) == 3, out.stdout + out.stderr
    assert all("'spill_bytes': 0" in line for line in reports), "\n".join(reports)


def test_backward_compiles_for_hopper():
    """The backward at every plan it has (L <= 2048), every option on. It spills a little today
    (benchmarks/NOTES.md), so only compiling is pinned here."""
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compile_check.py"
    env = dict(os.environ, PYTHONPATH=str(script.parents[1]))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, str(script), "--family", "v6", "--backward", "--all-options", "--lengths",
                          "1024", "2048"], capture_output=True, text=True, env=env, timeout=900)
    reports = [line for line in out.stdout.splitlines() if line.strip().startswith("backward")]
    assert out.returncode in (0, 1) and len(reports) == 2, out.stdout + out.stderr


def _call(args, dtype):
    from lcconv_compile.kernels import monarch_conv

    return monarch_conv.fftconv_fwd(**args, alloc=lambda shape, dtype, device: poisoned(shape, dtype, device))


@pytest.mark.cuda
@requires_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, L, Lk", [(2, 513, 513), (3, 1000, 17), (8, 1024, 1024), (1, 1500, 1500),
                                      (4, 2048, 2048), (5, 2048, 700), (2, 3000, 3000), (8, 4096, 4096),
                                      (2, 4096, 1)])
@pytest.mark.parametrize("options", [False, True])
def test_forward_matches_float64_reference(dtype, B, L, Lk, options):
    args = random_args(B, 6, L, Lk, dtype=dtype, options=options, k_dtype=torch.float32, device="cuda")
    got = _call(args, dtype)
    want = fftconv_ref(**as_float64(args))
    assert not got.isnan().any(), "an output element was never written"
    assert rel_err(got, want) <= 2e-3
    # the same schedule on CPU: a larger gap than rounding means the transcription is wrong
    emulated = monarch_plan.emulate_forward(**{n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in args.items()})
    assert rel_err(got.cpu(), emulated) <= 2e-3


def _candidates():
    from lcconv_compile.kernels import monarch_conv

    return [(n2, t) for n2, tunings in monarch_conv.CANDIDATE_TUNINGS.items() for t in tunings]


@pytest.mark.cuda
@requires_hopper
@pytest.mark.parametrize("n2, tuning", _candidates(), ids=str)
@pytest.mark.parametrize("options", [False, True])
def test_candidate_tunings_match_float64_reference(n2, tuning, options):
    """Every tuning the benchmark times against the dispatched one computes the same op (odd B,
    Lk < L, the cp.async staging path)."""
    from lcconv_compile.kernels import monarch_conv

    L = {16: 1024, 32: 2048, 64: 4096}[n2]
    args = random_args(5, 6, L, L - 300, dtype=torch.bfloat16, options=options, k_dtype=torch.float32, device="cuda")
    got = monarch_conv.fftconv_fwd(**args, alloc=lambda shape, dtype, device: poisoned(shape, dtype, device),
                                   tuning=tuning)
    want = fftconv_ref(**as_float64(args))
    assert not got.isnan().any(), "an output element was never written"
    assert rel_err(got, want) <= 2e-3
    spectrum = torch.float16 if tuning.k_half else None
    emulated = monarch_plan.emulate_forward(**{n: v.cpu() if isinstance(v, torch.Tensor) else v
                                               for n, v in args.items()}, spectrum=spectrum)
    assert rel_err(got.cpu(), emulated) <= 2e-3


@pytest.mark.cuda
@requires_hopper
def test_rows_keep_their_own_scale_and_zero_rows_stay_zero():
    """As the emulation (test_monarch_plan): a 1e8 and a 1e-8 row of one pair, a zero row."""
    args = random_args(4, 3, 2048, 2048, dtype=torch.bfloat16, options=False, k_dtype=torch.float32, device="cuda")
    args["u"][0] *= 1e8
    args["u"][1] *= 1e-8
    args["u"][2] = 0
    got = _call(args, torch.bfloat16)
    want = fftconv_ref(**as_float64(args))
    for b in (0, 1, 3):
        assert rel_err(got[b], want[b]) <= 2e-3
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.cuda
@requires_hopper
def test_supports_half_inputs_in_range_only():
    from lcconv_compile.kernels import monarch_conv

    k = torch.randn(2, 100, device="cuda")
    # (L, dtype, forward, both directions): the family's backward is v5's (BACKWARD_IS_V5), which
    # covers every forward length; v6's own Gluon backward stops at 2048 (backward_supported)
    for L, dtype, forward, both in [(1024, torch.bfloat16, True, True), (2048, torch.float16, True, True),
                                    (4096, torch.float16, True, True), (512, torch.bfloat16, False, False),
                                    (4097, torch.bfloat16, False, False), (1024, torch.float32, False, False)]:
        u = torch.empty(1, 2, L, device="cuda", dtype=dtype)
        assert monarch_conv.forward_supported(u, k) is forward and monarch_conv.supports(u, k) is both, (L, dtype)
        assert monarch_conv.backward_supported(L) is (forward and L <= 2048)
    assert not monarch_conv.forward_supported(torch.empty(1, 2, 50, device="cuda", dtype=torch.bfloat16), k)


def _grads(grad_y, args):
    from lcconv_compile.kernels import monarch_conv

    return monarch_conv.gluon_fftconv_bwd(grad_y, **args,
                                         alloc=lambda shape, dtype, device: poisoned(shape, dtype, device))


@pytest.mark.cuda
@requires_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, L, Lk", [(2, 513, 513), (3, 1000, 17), (8, 1024, 1024), (5, 2048, 700), (4, 2048, 2048)])
@pytest.mark.parametrize("options", [False, True])
def test_backward_matches_float64_reference(dtype, B, L, Lk, options):
    from lcconv_compile.reference import fftconv_bwd_ref

    args = random_args(B, 5, L, Lk, dtype=dtype, options=options, k_dtype=torch.float32, device="cuda")
    grad_y = torch.randn(B, 5, L, device="cuda").to(dtype)
    got = _grads(grad_y, args)
    want = fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    tol = dict(du=3e-3, dk=1e-2, dD=1e-2, dgate_in=3e-3, dgate_out=3e-3)
    for name, g, w in zip(want._fields, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert not g.isnan().any(), f"{name}: an element was never written"
            assert rel_err(g, w) <= tol[name], (name, rel_err(g, w))
    emulated = monarch_plan.emulate_backward(grad_y.cpu(), **{n: v.cpu() if isinstance(v, torch.Tensor) else v
                                                              for n, v in args.items()})
    for name, g, e in zip(want._fields, got, emulated):
        if e is not None:
            assert rel_err(g.cpu(), e) <= tol[name], ("against the emulation", name)


@pytest.mark.cuda
@requires_hopper
def test_backward_dk_and_dD_are_bit_identical_across_runs():
    args = random_args(8, 4, 2048, 2048, dtype=torch.bfloat16, options=True, k_dtype=torch.float32, device="cuda")
    grad_y = torch.randn(8, 4, 2048, device="cuda").to(torch.bfloat16)
    first, second = _grads(grad_y, args), _grads(grad_y, args)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


@pytest.mark.cuda
@requires_hopper
def test_the_op_runs_v6_when_opted_in_eager_and_compiled(monkeypatch):
    """With v6 in kernels.FAMILIES (what LCCONV_FLASHCONV6=1 does at import), the op's forward and
    backward run it (the backward on v5's kernels), eager and under torch.compile, where the CUDA
    stage leaves the forward's op call (opaque_family) and lowers the backward's: compiled equals
    eager."""
    import lcconv_compile
    from lcconv_compile import kernels
    from lcconv_compile.kernels import flashbutterfly, blockfft_conv, monarch_conv, shortconv
    from lcconv_compile.lowering import events
    from lcconv_compile.reference import fftconv_bwd_ref

    monkeypatch.setattr(kernels, "FAMILIES", (shortconv, monarch_conv, blockfft_conv, flashbutterfly))
    args = random_args(4, 8, 1024, 1024, dtype=torch.bfloat16, options=True, k_dtype=torch.float32, device="cuda")
    assert kernels.select(args["u"], args["k"]) is monarch_conv
    leaves = {n: v.requires_grad_() for n, v in args.items() if n in ("u", "k", "D", "gate_in", "gate_out")}

    def call(a):
        return lcconv_compile.fftconv(a["u"], a["k"], a["D"], gate_in=a["gate_in"], gate_out=a["gate_out"],
                                      gelu=True, dropout_mask=a["dropout_mask"])

    grad_y = torch.randn_like(args["u"])
    y = call(args)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    want_y = fftconv_ref(**as_float64({n: v.detach() if isinstance(v, torch.Tensor) else v for n, v in args.items()}))
    want = fftconv_bwd_ref(grad_y.double(), **as_float64({n: v.detach() if isinstance(v, torch.Tensor) else v
                                                         for n, v in args.items()}))
    assert rel_err(y, want_y) <= 2e-3
    for name, g in zip(leaves, grads):
        assert rel_err(g, getattr(want, "d" + name if name != "D" else "dD")) <= 1e-2, name
    torch._dynamo.reset()
    with events.collect() as recorded:
        y_c = torch.compile(call)(args)
        grads_c = torch.autograd.grad(y_c, list(leaves.values()), grad_y)
    opaque = [e for e in recorded if getattr(e, "code", None) == "opaque_family"]
    assert opaque and all(e.pattern == "fftconv" for e in opaque), [str(e) for e in opaque]
    assert torch.equal(y_c, y)
    for g_c, g in zip(grads_c, grads):
        assert torch.equal(g_c, g)


@pytest.mark.cuda
@requires_hopper
def test_a_nonfinite_row_does_not_reach_its_packed_partner():
    """As test_monarch_plan's: NaN/Inf rows come out all NaN, their partners right; a NaN in dy
    poisons its du row and its channel's dk and dD only."""
    B, H, L = 2, 3, 1024
    args = random_args(B, H, L, 700, dtype=torch.bfloat16, options=False, k_dtype=torch.float32, device="cuda")
    args["u"][0, 1, 500] = float("nan")
    args["u"][1, 2, 300] = float("inf")
    y = _call(args, torch.bfloat16)
    bad = torch.zeros(B, H, dtype=torch.bool, device="cuda")
    bad[0, 1] = bad[1, 2] = True
    assert torch.equal((~y.isfinite()).all(-1), bad) and torch.equal((~y.isfinite()).any(-1), bad)
    assert rel_err(y[~bad], fftconv_ref(**as_float64(args))[~bad]) <= 2e-3
    args = random_args(B, H, L, 700, dtype=torch.bfloat16, options=True, k_dtype=torch.float32, device="cuda")
    dy = torch.randn(B, H, L, device="cuda").to(torch.bfloat16)
    dy[1, 0, 100] = float("nan")
    du, dk, dD, _, _ = _grads(dy, args)
    bad = torch.zeros(B, H, dtype=torch.bool, device="cuda")
    bad[1, 0] = True
    assert torch.equal((~du.isfinite()).all(-1), bad) and torch.equal((~du.isfinite()).any(-1), bad)
    assert (~dk[0].isfinite()).all() and dk[1:].isfinite().all()
    assert not dD[0].isfinite() and dD[1:].isfinite().all()
