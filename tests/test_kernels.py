"""FlashConv kernels (kernels/flashconv.py) against the float64 reference.

On a CPU-only machine the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET)
at small sizes; on a GPU the same tests run on CUDA tensors, plus realistic sizes (marked cuda).
Outputs are poisoned with NaN before launch so an unwritten element fails.
"""


import pytest
import torch

from inputs import as_float64, poisoned, random_args, rel_err
from lcconv_compile import reference
from lcconv_compile.kernels import flashconv, monarch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (realistic sizes)")
# Accuracy targets (issue 3): relative error vs float64 <= 1e-3 for float32, 1e-2 for half inputs.
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_inputs(B, H, L, Lk, dtype, options):
    return random_args(B, H, L, Lk, dtype=dtype, options=options, device=DEVICE, k_dtype=torch.float32)


def check_forward(B, H, L, Lk, dtype, options):
    args = make_inputs(B, H, L, Lk, dtype, options)
    y = flashconv.fftconv_fwd(**args, alloc=poisoned)
    assert y.dtype == dtype and y.shape == (B, H, L)
    assert not torch.isnan(y).any(), "kernel left output elements unwritten"
    err = rel_err(y, reference.fftconv_ref(**as_float64(args)))
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return err


def check_backward(B, H, L, Lk, dtype, options):
    args = make_inputs(B, H, L, Lk, dtype, options)
    grad_y = torch.randn(B, H, L, device=DEVICE).to(dtype)
    got = flashconv.fftconv_bwd(grad_y, **args, alloc=poisoned)
    want = reference.fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    for name, g, w in zip(want._fields, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape, name
        assert not torch.isnan(g).any(), f"{name}: unwritten elements"
        err = rel_err(g, w)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e}"


# Small sizes: run everywhere (interpreter on CPU). Odd and tiny L, Lk < L, B odd (a lone row).
SMALL = [(1, 1, 1, 1), (2, 2, 16, 16), (3, 2, 100, 37), (1, 3, 256, 256), (2, 1, 257, 200)]


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("options", [False, True])
def test_forward_small(shape, options):
    check_forward(*shape, torch.float32, options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_small_half(dtype):
    check_forward(3, 2, 200, 150, dtype, True)


@pytest.mark.parametrize("shape", SMALL[1:])
@pytest.mark.parametrize("options", [False, True])
def test_backward_small(shape, options):
    check_backward(*shape, torch.float32, options)


def test_backward_small_half():
    check_backward(3, 2, 120, 120, torch.bfloat16, True)


@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_backward_stacks_agree_and_dk_is_deterministic(pairs):
    """Programs own fixed slices of the batch; dk and dD are reduced in a fixed order."""
    args = make_inputs(8, 2, 64, 64, torch.float32, False)
    grad_y = torch.randn(8, 2, 64, device=DEVICE)
    tuning = flashconv.Tuning(pairs=pairs, programs_per_sm=64)
    first = flashconv.fftconv_bwd(grad_y, **args, tuning=tuning)
    second = flashconv.fftconv_bwd(grad_y, **args, tuning=tuning)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    want = reference.fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    for got, ref in zip(first[:3], want[:3]):
        assert rel_err(got, ref) < 1e-3


@pytest.mark.parametrize("pairs", [1, 2, 4, 8])
def test_forward_stack_sizes_agree(pairs):
    args = make_inputs(7, 2, 100, 50, torch.float32, True)
    y = flashconv.fftconv_fwd(**args, alloc=poisoned, tuning=flashconv.Tuning(pairs=pairs))
    assert not torch.isnan(y).any()
    assert rel_err(y, reference.fftconv_ref(**as_float64(args))) < 1e-3


def test_gauss_three_product_form_agrees():
    args = make_inputs(4, 2, 120, 90, torch.bfloat16, True)
    tuning = flashconv.Tuning(gauss=True)
    y = flashconv.fftconv_fwd(**args, alloc=poisoned, tuning=tuning)
    assert rel_err(y, reference.fftconv_ref(**as_float64(args))) < TOL[torch.bfloat16]
    grad_y = torch.randn_like(args["u"])
    got = flashconv.fftconv_bwd(grad_y, **args, tuning=tuning)
    want = reference.fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[torch.bfloat16]


def test_launch_splits_the_batch_evenly():
    u = torch.empty(12, 3, 40)
    launch = flashconv._launch(u, flashconv.Tuning(pairs=2, programs_per_sm=6), default_per_sm=1)
    stacks = 3  # 6 pairs in stacks of 2
    assert launch.groups * launch.stacks_per_program == stacks and stacks % launch.groups == 0


def test_kernel_spectrum_is_not_cached_across_calls():
    """A changed k must never reuse a stale spectrum."""
    args = make_inputs(2, 2, 64, 64, torch.float32, False)
    y1 = flashconv.fftconv_fwd(**args)
    args["k"] = torch.randn_like(args["k"])
    y2 = flashconv.fftconv_fwd(**args)
    assert rel_err(y2, reference.fftconv_ref(**as_float64(args))) < 1e-3
    assert not torch.allclose(y1, y2)


def test_monarch_plan_and_spectrum_roundtrip():
    for seqlen in (1, 16, 255, 256, 1000, 4096, 8192):
        plan = monarch.plan_for(seqlen)
        assert plan.fft_size >= 2 * seqlen and plan.n1 * plan.n2 == plan.fft_size
        assert plan.n1 // 2 >= 16 and plan.n2 >= 16
        assert plan.n1 % plan.chunk == 0 and plan.chunk >= 16
    plan = monarch.plan_for(300)
    k = torch.randn(3, 300, dtype=torch.float64)
    spectrum = monarch.kernel_spectrum_reference(k, plan) * plan.fft_size**0.5  # fft(k)
    natural = torch.stack([spectrum.real, spectrum.imag], dim=1)
    torch.testing.assert_close(monarch.spectrum_to_time(natural, plan, 300), k)


@pytest.mark.parametrize("precision", ["fp16", "ieee"])
def test_spectrum_kernel_matches_fft(precision):
    plan = monarch.plan_for(200)
    k = torch.randn(3, 150, device=DEVICE) * torch.tensor([[1.0], [1e-3], [50.0]], device=DEVICE)
    planes, scales = flashconv.kernel_spectrum(k, plan, precision)
    want = monarch.kernel_spectrum_reference(k.cpu(), plan)
    got = torch.complex(planes[:, 0].double(), planes[:, 1].double()).cpu()
    got = got * (scales[:, 0] * scales[:, 1]).cpu().double()[:, None, None] / plan.fft_size**0.5
    for h in range(3):  # per channel: each keeps its own scale
        assert rel_err(torch.view_as_real(got[h]), torch.view_as_real(want[h])) < 2e-3


def test_supports_covers_only_the_single_pass_range():
    u, k = torch.randn(1, 1, 16), torch.randn(1, 16)
    assert not flashconv.supports(u, k)  # CPU tensors: the op uses the reference
    assert not flashconv.supports(u.double(), k.double())
    if HAS_CUDA:
        assert flashconv.supports(u.cuda(), k.cuda())
        too_long = torch.randn(1, 1, flashconv.MAX_SEQLEN[torch.float32] + 1, device="cuda")
        assert not flashconv.supports(too_long, k.cuda())
        assert flashconv.supports(too_long.bfloat16(), k.cuda())


# Realistic sizes on the GPU.
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("L", [16, 100, 256, 1000, 1024, 2048, 4096, 4095, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_gpu_lengths(L, dtype):
    if L > flashconv.MAX_SEQLEN[dtype]:
        pytest.skip(f"{dtype} beyond {flashconv.MAX_SEQLEN[dtype]} runs the reference (tested below)")
    check_forward(4, 64, L, max(1, L // 3 if L % 2 else L), dtype, options=True)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("B,H,L", [(16, 1024, 1024), (8, 1024, 4096), (1, 7, 8191), (5, 33, 2000)])
@pytest.mark.parametrize("options", [False, True])
def test_forward_gpu_large(B, H, L, options):
    check_forward(B, H, L, L, torch.bfloat16, options)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("L", [16, 333, 1024, 4096, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [False, True])
def test_backward_gpu(L, dtype, options):
    if L > flashconv.MAX_SEQLEN[dtype]:
        pytest.skip(f"{dtype} beyond {flashconv.MAX_SEQLEN[dtype]} runs the reference (tested below)")
    check_backward(6, 48, L, max(1, L // 2), dtype, options)


@pytest.mark.cuda
@requires_cuda
def test_backward_gpu_large_batch_is_deterministic():
    args = make_inputs(16, 256, 2048, 2048, torch.bfloat16, True)
    grad_y = torch.randn(16, 256, 2048, device="cuda", dtype=torch.bfloat16)
    first = flashconv.fftconv_bwd(grad_y, **args)
    second = flashconv.fftconv_bwd(grad_y, **args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_falls_back_to_reference_beyond_the_limit(dtype):
    L = flashconv.MAX_SEQLEN[dtype] + 1
    args = make_inputs(2, 4, L, L, dtype, True)
    assert not flashconv.supports(args["u"], args["k"])
    y = torch.ops.lcconv.fftconv(**args)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the reference: a float32 FFT
    assert rel_err(y, reference.fftconv_ref(**as_float64(args))) < tol
    grad_y = torch.randn_like(args["u"])
    grads = torch.ops.lcconv.fftconv_bwd(grad_y, args["u"], args["k"], args["D"], args["gate_in"],
                                         args["gate_out"], True, args["dropout_mask"])
    want = reference.fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    assert rel_err(grads[0], want.du) < tol and rel_err(grads[1], want.dk) < tol
