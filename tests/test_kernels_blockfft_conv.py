"""FlashConv v5 (kernels/blockfft_conv.py, kernels/blockfft.py) against torch.fft and the float64
reference.

On a CPU-only machine the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET)
at small sizes, with small block-FFT factors (N = 64..1024); on a GPU the same tests run on
CUDA tensors, plus realistic sizes (marked cuda). Outputs are poisoned with NaN before launch
so an unwritten element fails.
"""

import dataclasses
import math

import pytest
import torch
import triton
import triton.language as tl

from inputs import as_float64, poisoned, random_args, rel_err
from lcconv_compile import reference
from oracles import assert_backward_matches_reference
from lcconv_compile.kernels import blockfft, blockfft_conv

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (realistic sizes)")
# Relative error vs float64: half outputs are dominated by their own rounding (~1.7e-3 for
# bf16, measured); 3xtf32 on float32 inputs must stay under 1e-4. Gradients of half inputs go
# through GELU' and the gates at bf16 precision (~3-7e-3 measured, as for flashconv v3/v4).
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def small_tuning(**fields):
    """A Tuning with small block-FFT factors: Triton's interpreter runs them, a GPU cannot compile
    them (blockfft.compiles_on_gpu), so on a GPU the test is skipped, not counted as a pass."""
    tuning = blockfft_conv.Tuning(**fields)
    if HAS_CUDA and not blockfft.compiles_on_gpu(blockfft.plan_for(1, tuning.factors, tuning.chunk)):
        pytest.skip(f"factors {tuning.factors} (chunk {tuning.chunk}) are for the interpreter only")
    return tuning


# ------------------------------------- the kernel helpers as a stand-alone transform (oracle) --
@triton.jit
def _block_fft_kernel(x_ptr, out_ptr, w1_ptr, w1i_ptr, w2_ptr, w2i_ptr, w3_ptr, w3i_ptr,
                      N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr, CHUNK: tl.constexpr,
                      PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr):
    """out[row] = U x[row] in the chunked spectrum order; x: planes (2, rows, N/2)."""
    row = tl.program_id(0)
    rows = tl.num_programs(0)
    M: tl.constexpr = N2 * N3
    HALF: tl.constexpr = N1 // 2
    t = tl.arange(0, HALF)[None, :] * M + tl.arange(0, M)[:, None]
    xr = tl.load(x_ptr + row * (M * HALF) + t)
    xi = tl.load(x_ptr + (rows + row) * (M * HALF) + t)
    x0 = blockfft.interleave(xr, xi, PRECISION)
    stage = blockfft.load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, N2, N3)
    size: tl.constexpr = CHUNK * N2 * N3
    offs = tl.arange(0, CHUNK * N2)[:, None] * N3 + tl.arange(0, N3)[None, :]
    for chunk_start in tl.range(0, N1, CHUNK):
        w1, unused_w1i = blockfft.load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
        sr, si = blockfft.forward_chunk(x0, w1, chunk_start, stage, 1, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        base = (chunk_start // CHUNK) * size
        tl.store(out_ptr + row * (N1 * M) + base + offs, sr)
        tl.store(out_ptr + (rows + row) * (N1 * M) + base + offs, si)


def block_fft(x: torch.Tensor, plan: blockfft.BlockFFTPlan, precision: str = "ieee") -> torch.Tensor:
    """U x (unitary DFT of size N, natural order) of complex rows x (R, <= N/2) via the kernel's
    forward transform; a test of the helpers against torch.fft."""
    rows, length = x.shape
    padded = torch.zeros(2, rows, plan.fft_size // 2, dtype=torch.float32, device=x.device)
    padded[0, :, :length], padded[1, :, :length] = x.real, x.imag
    operand_dtype = torch.float16 if precision == "fp16" else torch.float32
    consts = blockfft.block_fft_constants(plan, operand_dtype, x.device)
    out = torch.full((2, rows, plan.fft_size), math.nan, dtype=torch.float32, device=x.device)
    _block_fft_kernel[(rows,)](padded, out, *consts, N1=plan.n1, N2=plan.n2, N3=plan.n3,
                               CHUNK=plan.chunk, PRECISION=precision, FAST_TRIG=x.is_cuda,
                               num_warps=4)
    natural = torch.empty(rows, plan.fft_size, dtype=torch.complex64, device=x.device)
    natural[:, blockfft.spectrum_order(plan).to(x.device)] = torch.complex(out[0], out[1])
    return natural


def check_forward(B, H, L, Lk, dtype, options, tuning=blockfft_conv.Tuning()):
    args = random_args(B, H, L, Lk, dtype=dtype, options=options, device=DEVICE, k_dtype=torch.float32)
    y = blockfft_conv.fftconv_fwd(**args, alloc=poisoned, tuning=tuning)
    assert y.dtype == dtype and y.shape == (B, H, L)
    assert not torch.isnan(y).any(), "kernel left output elements unwritten"
    err = rel_err(y, reference.fftconv_ref(**as_float64(args)))
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return err


def check_backward(B, H, L, Lk, dtype, options, tuning=blockfft_conv.Tuning()):
    args = random_args(B, H, L, Lk, dtype=dtype, options=options, device=DEVICE, k_dtype=torch.float32)
    grad_y = torch.randn(B, H, L, device=DEVICE).to(dtype)
    got = blockfft_conv.fftconv_bwd(grad_y, **args, alloc=poisoned, tuning=tuning)
    assert_backward_matches_reference(got, grad_y, args, GRAD_TOL[dtype])


# --------------------------------------------------------------- the three-level transform --
@pytest.mark.parametrize("factors,chunk", [((4, 4, 4), 2), ((8, 8, 4), 4), ((4, 2, 8), 4), ((16, 8, 8), 8)])
def test_block_fft_matches_torch_fft(factors, chunk):
    small_tuning(factors=factors, chunk=chunk)  # skips on a GPU where the plan cannot compile
    plan = blockfft.plan_for(1, factors=factors, chunk=chunk)
    x = torch.randn(3, plan.fft_size // 2, dtype=torch.complex64, device=DEVICE)
    got = block_fft(x, plan)
    want = torch.fft.fft(x.cpu().to(torch.complex128), n=plan.fft_size) / math.sqrt(plan.fft_size)
    assert rel_err(torch.view_as_real(got.cpu()), torch.view_as_real(want)) < 1e-6


def test_block_fft_fp16_operands_stay_accurate():
    plan = blockfft.plan_for(1, factors=(16, 8, 8))
    x = torch.randn(2, plan.fft_size // 2, dtype=torch.complex64, device=DEVICE)
    x = x / x.abs().amax(dim=1, keepdim=True)  # the kernels feed max-scaled rows
    got = block_fft(x, plan, precision="fp16")
    want = torch.fft.fft(x.cpu().to(torch.complex128), n=plan.fft_size) / math.sqrt(plan.fft_size)
    assert rel_err(torch.view_as_real(got.cpu()), torch.view_as_real(want)) < 2e-3


def test_stage_matrices_are_unitary_and_interleaved():
    plan = blockfft.plan_for(100)
    w1, w1i, w2, w2i, w3, w3i = blockfft.block_fft_constants(plan, torch.float32, "cpu")
    for fwd, inv in ((w2, w2i), (w3, w3i)):
        torch.testing.assert_close(fwd.double() @ inv.double(), torch.eye(fwd.shape[0], dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    # W1 keeps only n1 < N1/2 inputs and W1inv only those outputs: W1 W1inv is the identity there.
    torch.testing.assert_close(w1.double() @ w1i.double(), torch.eye(plan.n1, dtype=torch.float64), atol=1e-6, rtol=0)
    z = torch.randn(5, 3, dtype=torch.complex128)
    f = torch.randn(3, 4, dtype=torch.complex128)
    prod = torch.view_as_real(z).reshape(5, 6) @ blockfft.interleaved(f)
    torch.testing.assert_close(torch.view_as_complex(prod.reshape(5, 4, 2).contiguous()), z @ f)


def test_plan_sizes_and_refusals():
    for seqlen in (1, 5, 512, 513, 1000, 4096, 8192):
        plan = blockfft.plan_for(seqlen)
        assert plan.fft_size >= 2 * seqlen and plan.n1 * plan.n2 * plan.n3 == plan.fft_size
        assert plan.n1 >= 16 and min(plan.n2, plan.n3) >= 8 and 2 * plan.chunk >= 16
    with pytest.raises(ValueError, match="seqlen=8193"):
        blockfft.plan_for(8193)
    with pytest.raises(ValueError, match="factors"):
        blockfft.plan_for(100, factors=(4, 4, 4))  # N = 64 < 200
    with pytest.raises(ValueError, match="factors"):
        blockfft.plan_for(10, factors=(4, 3, 4))
    with pytest.raises(ValueError, match="chunk"):
        blockfft.plan_for(10, factors=(4, 4, 4), chunk=8)


def test_launch_defaults_per_direction():
    """The measured defaults: a wider N1 for the forward at N >= 8192, the table's plan and more
    warps for the backward; explicit tunings win."""
    u = torch.empty(8, 4, 4096, dtype=torch.bfloat16)
    fwd, bwd = blockfft_conv._launch(u, blockfft_conv.Tuning()), blockfft_conv._launch(u, blockfft_conv.Tuning(), backward=True)
    assert (fwd.plan.n1, fwd.plan.n2, fwd.plan.n3, fwd.num_warps) == (64, 16, 8, 4)
    assert (bwd.plan.n1, bwd.plan.n2, bwd.plan.n3, bwd.num_warps) == (32, 16, 16, 8)
    assert blockfft_conv._launch(torch.empty(8, 4, 1024), blockfft_conv.Tuning()).pairs == 4
    assert blockfft_conv._launch(torch.empty(2, 4, 1024), blockfft_conv.Tuning()).pairs == 1  # one pair in the batch
    mine = blockfft_conv._launch(u, small_tuning(factors=(32, 16, 16), num_warps=16, pairs=2))
    assert (mine.plan.n1, mine.num_warps, mine.pairs) == (32, 16, 2)


# ------------------------------------------------------------------------------ the forward --
# Small factors in the interpreter (fast); (16, 8, 8) is the smallest compiled plan.
SMALL = [
    # B, H, L, Lk, factors, chunk
    (2, 2, 5, 5, (4, 4, 4), 2),
    (3, 2, 5, 1, (4, 4, 4), 4),
    (1, 3, 32, 17, (4, 4, 4), 2),
    (3, 2, 100, 37, (8, 8, 4), 4),
    (2, 1, 100, 100, (4, 8, 8), 4),
    (4, 2, 256, 256, (8, 8, 8), 8),
    (5, 2, 255, 1, (16, 8, 8), 8),
]


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("options", [False, True])
def test_forward_small_float32(shape, options):
    B, H, L, Lk, factors, chunk = shape
    check_forward(B, H, L, Lk, torch.float32, options, small_tuning(factors=factors, chunk=chunk))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SMALL[1], SMALL[3], SMALL[5]])
def test_forward_small_half(dtype, shape):
    B, H, L, Lk, factors, chunk = shape
    check_forward(B, H, L, Lk, dtype, True, small_tuning(factors=factors, chunk=chunk))


def test_forward_default_plan_half():
    """The smallest compiled plan (N = 1024), default launch, odd L and Lk < L."""
    check_forward(3, 2, 301, 150, torch.bfloat16, True)


@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_forward_stack_sizes_agree(pairs):
    """Odd batch (a lone row in the last pair) and stacks of several pairs."""
    check_forward(7, 2, 60, 30, torch.float32, True, small_tuning(pairs=pairs, factors=(8, 4, 4), chunk=4))


def test_forward_channel_scales_are_independent():
    """Rows and kernels of very different magnitudes (per-row / per-channel max scaling)."""
    args = random_args(4, 3, 100, 80, dtype=torch.bfloat16, options=False, device=DEVICE, k_dtype=torch.float32)
    args["u"] = (args["u"].float() * torch.tensor([1e-3, 1.0, 1e3], device=DEVICE)[:, None]).bfloat16()
    args["k"] = args["k"] * torch.tensor([[1e2], [1e-4], [1.0]], device=DEVICE)
    y = blockfft_conv.fftconv_fwd(**args, alloc=poisoned, tuning=small_tuning(factors=(8, 8, 4), chunk=4))
    want = reference.fftconv_ref(**as_float64(args))
    for h in range(3):
        assert rel_err(y[:, h], want[:, h]) < TOL[torch.bfloat16], f"channel {h}"


def test_kernel_spectrum_is_recomputed_every_call():
    """A changed k (new data, same tensor) must never reuse a stale spectrum."""
    args = random_args(2, 2, 64, 64, dtype=torch.float32, options=False, device=DEVICE)
    tuning = small_tuning(factors=(8, 4, 4), chunk=4)
    y1 = blockfft_conv.fftconv_fwd(**args, tuning=tuning)
    args["k"].copy_(torch.randn_like(args["k"]))
    y2 = blockfft_conv.fftconv_fwd(**args, tuning=tuning)
    assert rel_err(y2, reference.fftconv_ref(**as_float64(args))) < TOL[torch.float32]
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("shape", [SMALL[0], SMALL[1], SMALL[3], SMALL[6]])
@pytest.mark.parametrize("options", [False, True])
def test_backward_small_float32(shape, options):
    B, H, L, Lk, factors, chunk = shape
    check_backward(B, H, L, Lk, torch.float32, options, small_tuning(factors=factors, chunk=chunk))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_small_half(dtype):
    check_backward(3, 2, 120, 90, dtype, True, small_tuning(factors=(8, 8, 4), chunk=4))


def test_backward_default_plan_half():
    check_backward(3, 2, 301, 1, torch.bfloat16, True)


@pytest.mark.parametrize("pairs", [1, 2])
def test_backward_stacks_agree_and_dk_is_deterministic(pairs):
    """One program per channel sums dk and dD over its stacks in a fixed order."""
    args = random_args(7, 2, 60, 40, dtype=torch.float32, options=True, device=DEVICE)
    grad_y = torch.randn(7, 2, 60, device=DEVICE)
    tuning = small_tuning(pairs=pairs, factors=(8, 4, 4), chunk=4)
    first = blockfft_conv.fftconv_bwd(grad_y, **args, tuning=tuning)
    second = blockfft_conv.fftconv_bwd(grad_y, **args, tuning=tuning)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    want = reference.fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    for name, got, ref in zip(want._fields, first, want):
        assert rel_err(got, ref) < GRAD_TOL[torch.float32], name


# --------------------------------------------------- k spectrum per item or per stack --
KNOBS = [blockfft_conv.Tuning(kernel_spectrum=spectrum) for spectrum in blockfft_conv.KERNEL_SPECTRUM]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda t: t.kernel_spectrum)
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_knobs_agree(knobs, channels):
    """Every item holds one or several stacks (7 rows, 1 pair per stack: 4 stacks per channel;
    the CPU counts 1 SM, so the grid aims for ITEMS_PER_SM items: one channel splits into 4
    groups of 1 stack, three channels into 2 groups of 2 stacks), with k's spectrum kept per
    item or recomputed per stack."""
    tuning = small_tuning(**{**dataclasses.asdict(knobs), "pairs": 1, "factors": (8, 4, 4), "chunk": 4})
    assert [blockfft_conv._launch(torch.empty(7, channels, 60), tuning).groups] == [{1: 4, 3: 2}[channels]]
    check_forward(7, channels, 60, 45, torch.float32, True, tuning)
    check_forward(7, channels, 60, 45, torch.bfloat16, False, tuning)


@pytest.mark.parametrize("kernel_spectrum", blockfft_conv.KERNEL_SPECTRUM)
def test_backward_kernel_spectrum_agree(kernel_spectrum):
    tuning = small_tuning(pairs=1, factors=(8, 4, 4), chunk=4, kernel_spectrum=kernel_spectrum)
    check_backward(5, 2, 60, 33, torch.float32, True, tuning)


def test_launch_knob_defaults_and_refusals():
    u = torch.empty(8, 1024, 4096, dtype=torch.bfloat16, device="meta")
    launch = blockfft_conv._launch(u, blockfft_conv.Tuning())
    # B=8 at 4K: 4 stacks of 1 pair per channel -> the spectrum is kept per item.
    assert (launch.kernel_spectrum, launch.stacks_per_item, launch.blocks) == ("scratch", 4, 1)
    assert launch.groups == 1  # 1024 channels fill ITEMS_PER_SM x 1 SM on a meta tensor
    # One stack per item (1K: 4 pairs per stack): nothing to share, no scratch round trip.
    assert blockfft_conv._launch(u[..., :1024], blockfft_conv.Tuning()).kernel_spectrum == "recompute"
    with pytest.raises(ValueError, match="kernel_spectrum"):
        blockfft_conv._launch(u, blockfft_conv.Tuning(kernel_spectrum="cached"))
    with pytest.raises(ValueError, match="blocks"):
        blockfft_conv._launch(u, blockfft_conv.Tuning(blocks=3))


# ---------------------------------------------- two on-chip blocks (L up to 2 x one plan) --
def test_two_blocks_by_default_beyond_one_plan():
    for dtype, seqlen, plan_size in ((torch.bfloat16, 16384, 16384), (torch.float16, 9000, 16384),
                                     (torch.float32, 4096, 4096), (torch.float32, 2049, 4096)):
        launch = blockfft_conv._launch(torch.empty(8, 4, seqlen, dtype=dtype, device="meta"), blockfft_conv.Tuning())
        assert (launch.blocks, launch.plan.fft_size) == (2, plan_size), (dtype, seqlen)
    for dtype, seqlen in ((torch.bfloat16, 8192), (torch.float32, 2048)):
        assert blockfft_conv._launch(torch.empty(8, 4, seqlen, dtype=dtype, device="meta"), blockfft_conv.Tuning()).blocks == 1
    assert blockfft_conv.MAX_SEQLEN == {torch.bfloat16: 16384, torch.float16: 16384, torch.float32: 4096}


TWO_BLOCKS = [
    # B, H, L, Lk, factors, chunk: block of T = N/2 samples, L in (T, 2T] (and one L <= T)
    (2, 2, 64, 64, (4, 4, 4), 2),
    (3, 2, 61, 40, (4, 4, 4), 2),  # odd L, Lk > T: k1 holds data
    (3, 1, 50, 20, (4, 4, 4), 4),  # Lk < T: K1 = 0
    (1, 2, 30, 30, (4, 4, 4), 2),  # L <= T: block 1 all padding
    (4, 2, 200, 131, (8, 8, 4), 4),
]


@pytest.mark.parametrize("shape", TWO_BLOCKS)
@pytest.mark.parametrize("options", [False, True])
def test_forward_two_blocks(shape, options):
    B, H, L, Lk, factors, chunk = shape
    for spectrum in blockfft_conv.KERNEL_SPECTRUM:
        tuning = small_tuning(blocks=2, factors=factors, chunk=chunk, kernel_spectrum=spectrum)
        check_forward(B, H, L, Lk, torch.float32, options, tuning)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_two_blocks_half(dtype):
    check_forward(5, 2, 250, 200, dtype, True, small_tuning(blocks=2, factors=(8, 8, 4), chunk=4))


@pytest.mark.parametrize("shape", [TWO_BLOCKS[1], TWO_BLOCKS[2], TWO_BLOCKS[4]])
@pytest.mark.parametrize("options", [False, True])
def test_backward_two_blocks(shape, options):
    B, H, L, Lk, factors, chunk = shape
    check_backward(B, H, L, Lk, torch.float32, options, small_tuning(blocks=2, factors=factors, chunk=chunk))


def test_backward_two_blocks_half_and_deterministic():
    tuning = small_tuning(blocks=2, factors=(8, 8, 4), chunk=4, pairs=1)
    check_backward(5, 2, 250, 250, torch.bfloat16, True, tuning)
    args = random_args(5, 2, 250, 250, dtype=torch.float32, options=True, device=DEVICE)
    grad_y = torch.randn(5, 2, 250, device=DEVICE)
    first = blockfft_conv.fftconv_bwd(grad_y, **args, tuning=tuning)
    second = blockfft_conv.fftconv_bwd(grad_y, **args, tuning=tuning)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_two_blocks_default_compiled_plan_half():
    """The smallest compiled plan (N = 1024) as two blocks: L up to 1024."""
    check_forward(3, 1, 1000, 777, torch.bfloat16, True, small_tuning(blocks=2, factors=(16, 8, 8)))


def test_gpu_refuses_plans_it_cannot_compile():
    """On CUDA tensors small (interpreter-only) factors are refused by name, not left to a
    compiler assertion; every default plan is one a GPU compiles."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # CUDA tensors without a GPU: _launch reads shapes, dtypes, devices
        u = torch.empty(2, 3, 60, device="cuda")
    with pytest.raises(ValueError, match="a GPU needs n1 >= 16"):
        blockfft_conv._launch(u, blockfft_conv.Tuning(factors=(8, 4, 4), chunk=4))
    assert blockfft_conv._launch(u, blockfft_conv.Tuning()).plan.fft_size == blockfft.MIN_FFT_SIZE
    assert all(blockfft.compiles_on_gpu(blockfft.plan_for(1, f)) for f in blockfft.FACTORS.values())


def test_supports():
    u, k = torch.randn(1, 1, 16), torch.randn(1, 16)
    assert not blockfft_conv.supports(u, k)  # CPU tensors: another family or the reference
    if HAS_CUDA:
        assert blockfft_conv.supports(u.cuda(), k.cuda())
        too_long = torch.randn(1, 1, blockfft_conv.MAX_SEQLEN[torch.float32] + 1, device="cuda")
        assert not blockfft_conv.supports(too_long, k.cuda())
        assert blockfft_conv.supports(too_long.bfloat16(), k.cuda())


# ----------------------------------------------------------------------------- on the GPU --
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("L", [1, 16, 100, 511, 1024, 2048, 4095, 4096, 8192, 12000, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_gpu_lengths(L, dtype):
    if L > blockfft_conv.MAX_SEQLEN[dtype]:
        pytest.skip(f"{dtype} beyond {blockfft_conv.MAX_SEQLEN[dtype]}: not a v5 size")
    check_forward(4, 64, L, max(1, L // 3 if L % 2 else L), dtype, options=True)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("B,H,L", [(8, 1024, 1024), (8, 1024, 4096), (8, 256, 8192), (1, 7, 8191), (5, 33, 2000)])
@pytest.mark.parametrize("options", [False, True])
def test_forward_gpu_large(B, H, L, options):
    check_forward(B, H, L, L, torch.bfloat16, options)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("tuning", [blockfft_conv.Tuning(num_warps=8), blockfft_conv.Tuning(pairs=1),
                                    blockfft_conv.Tuning(pairs=4), blockfft_conv.Tuning(chunk=16)] + KNOBS)
def test_forward_gpu_tunings_agree(tuning):
    check_forward(8, 64, 1024, 1024, torch.bfloat16, True, tuning)
    check_forward(8, 64, 4096, 4096, torch.bfloat16, True, tuning)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("L", [16, 333, 1024, 2048, 3000, 4096, 8192, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [False, True])
@pytest.mark.parametrize("B", [6, 1])  # B <= 2: one stack per program (the kernel-spectrum default differs)
def test_backward_gpu(L, dtype, options, B):
    if L > blockfft_conv.MAX_SEQLEN[dtype]:
        pytest.skip(f"{dtype} beyond {blockfft_conv.MAX_SEQLEN[dtype]}: not a v5 size")
    check_backward(B, 48, L, max(1, L // 2), dtype, options)


@pytest.mark.parametrize("dtype,L", [(torch.bfloat16, 16384), (torch.float32, 4096)])
def test_two_block_backward_never_recomputes_the_kernel_spectrum(dtype, L):
    """Recomputing k's spectrum per program needs > 227 KB of shared memory in the two-block
    backward (compile_check): the launch must keep it in scratch even for one stack (B <= 2)."""
    launch = blockfft_conv._launch_for((1, 4, L), dtype, torch.device("cuda"), blockfft_conv.Tuning(), True)
    assert launch.blocks == 2 and launch.kernel_spectrum == "scratch"
    forward = blockfft_conv._launch_for((1, 4, L), dtype, torch.device("cuda"), blockfft_conv.Tuning(), False)
    assert forward.kernel_spectrum == "recompute"  # fits (160 / 231 KB): no round trip


@pytest.mark.cuda
@requires_cuda
def test_backward_gpu_large_batch_is_deterministic():
    args = random_args(16, 256, 2048, 2048, dtype=torch.bfloat16, options=True, device="cuda",
                       k_dtype=torch.float32)
    grad_y = torch.randn(16, 256, 2048, device="cuda", dtype=torch.bfloat16)
    first = blockfft_conv.fftconv_bwd(grad_y, **args)
    second = blockfft_conv.fftconv_bwd(grad_y, **args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------- NaN/Inf: packed rows must not reach each other --
@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nonfinite_row_does_not_reach_its_packed_partner(blocks, dtype):
    """Two rows travel as one complex row: a NaN in u[0, 1] once made y[1, 1] NaN and an Inf in
    u[1, 2] made y[0, 2] NaN, where the eager FFT keeps every other row finite (README, "NaN and
    Inf": never widen). Each such row is now transformed as zeros and comes out all NaN (as the
    eager FFT's does); the others equal the reference. Backward: a NaN in dy[1, 0] makes du[1, 0]
    and channel 0's dk and dD NaN, nothing else."""
    B, H, L = 2, 3, 250 if blocks == 2 else 60
    tuning = small_tuning(blocks=blocks, factors=(8, 8, 4) if blocks == 2 else (8, 4, 4), chunk=4)
    u = torch.randn(B, H, L, device=DEVICE).to(dtype)
    k = torch.randn(H, L - 7, device=DEVICE) / math.sqrt(L)
    D = torch.randn(H, device=DEVICE)
    u[0, 1, L // 2] = float("nan")
    u[1, 2, L // 3] = float("inf")
    y = blockfft_conv.fftconv_fwd(u, k, D, tuning=tuning)
    bad = torch.zeros(B, H, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.equal((~y.isfinite()).all(-1).cpu(), bad) and torch.equal((~y.isfinite()).any(-1).cpu(), bad)
    want = reference.fftconv_ref(u.double(), k.double(), D.double())
    assert rel_err(y[~bad], want[~bad]) < TOL[dtype]

    u = torch.randn(B, H, L, device=DEVICE).to(dtype)
    dy = torch.randn(B, H, L, device=DEVICE).to(dtype)
    dy[1, 0, L // 4] = float("nan")
    du, dk, dD, _, _ = blockfft_conv.fftconv_bwd(dy, u, k, D, tuning=tuning)
    bad = torch.zeros(B, H, dtype=torch.bool)
    bad[1, 0] = True
    assert torch.equal((~du.isfinite()).all(-1).cpu(), bad) and torch.equal((~du.isfinite()).any(-1).cpu(), bad)
    assert (~dk[0].isfinite()).all() and dk[1:].isfinite().all()
    assert not dD[0].isfinite() and dD[1:].isfinite().all()
    want = reference.fftconv_bwd_ref(dy.double(), u.double(), k.double(), D.double())
    assert rel_err(du[~bad], want.du[~bad]) < GRAD_TOL[dtype]
    assert rel_err(dk[1:], want.dk[1:]) < GRAD_TOL[dtype]
