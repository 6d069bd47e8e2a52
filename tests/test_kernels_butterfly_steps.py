"""kernels/butterfly_steps.py: FlashButterfly's exact-factor steps 1 and 3 (tensor-core DFT of size N1 +
twiddle) in every mode, against float64 sums written out with torch.fft, outputs poisoned.

CPU: Triton's interpreter at small sizes, including N1 < 16 (padded blocks), N1 = 128 (two
row blocks and two K chunks) and N1 = 256 / 1024 (the two-level kernels). GPU (marked cuda): the
real splits at N1 = 16 to 1024."""

import math

import pytest
import torch

from inputs import poisoned, rel_err, sum_err
from lcconv_compile.kernels import butterfly_steps

HAS_CUDA = torch.cuda.is_available()


def step1_ref(x, n1, n2, scale=1.0, mask=None):
    """z[k1, c] = scale * w_N^(k1 c) * sum_n1 w_N1^(k1 n1) x[n1 N2 + c] (complex128)."""
    B, H, L = x.shape
    n = n1 * n2
    xs = torch.nn.functional.pad(x.double(), (0, n - L)).view(B, H, n1, n2)
    if mask is not None:
        xs = xs * mask.double()[:, :, None, None]
    tw = torch.exp(-2j * math.pi * torch.outer(torch.arange(n1), torch.arange(n2)).double() / n)
    return torch.fft.fft(xs, dim=2) * tw * scale


def step3_ref(z, L, scale=1.0):
    """Re(sum_k1 conj(w_N1^(k1 n1)) conj(w_N^(k1 c)) z[k1, c]) * scale, the first L samples."""
    B, H, n1, n2 = z.shape
    n = n1 * n2
    tw = torch.exp(2j * math.pi * torch.outer(torch.arange(n1), torch.arange(n2)).double() / n)
    y = (torch.fft.ifft(z * tw, dim=2) * n1).real * scale
    return y.reshape(B, H, n)[..., :L]


def as_pairs(z, dtype):
    return torch.view_as_real(z).to(dtype).contiguous()


def interpreter_only():
    if HAS_CUDA:
        pytest.skip("small sizes on CPU tensors are for Triton's interpreter only")


# (N1, N2, L): padded N1, multi-chunk N1, then the two-level kernels (N1 = 16 x Q)
SPLITS = [(2, 16, 29), (4, 8, 32), (16, 4, 50), (128, 4, 400), (256, 4, 700), (1024, 8, 5000)]


@pytest.mark.parametrize("n1,n2,L", SPLITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step1(n1, n2, L, dtype):
    interpreter_only()
    B, H = 2, 3
    x = torch.randn(B, L, H).transpose(1, 2)  # non-contiguous
    mask = (torch.rand(B, H) > 0.3).float() / 0.7
    u = torch.randn(B, H, L)
    z, dd = butterfly_steps.step1(x, (n1, n2), dtype, scale=0.25, dropout_mask=mask, dd_with=u, alloc=poisoned, block_n=4)
    assert z.dtype == dtype and z.shape == (B, H, n1, n2, 2)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel_err(z, torch.view_as_real(step1_ref(x, n1, n2, 0.25, mask))) < tol
    terms = x.double() * mask.double()[..., None] * u.double()  # dD's sum: its terms cancel
    assert sum_err(dd, terms.sum((0, 2)), terms.abs().sum((0, 2))) < 1e-6
    z0, dd0 = butterfly_steps.step1(x, (n1, n2), dtype, alloc=poisoned)
    assert dd0 is None and rel_err(z0, torch.view_as_real(step1_ref(x, n1, n2))) < tol


@pytest.mark.parametrize("n1,n2,L", SPLITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gelu", [False, True])
def test_step3_value(n1, n2, L, dtype, gelu):
    interpreter_only()
    B, H = 2, 3
    z = torch.randn(B, H, n1, n2, dtype=torch.complex128)
    skip, D = torch.randn(B, H, L), torch.randn(H)
    skip_mask = (torch.rand(B, H) > 0.3).float()
    mask = (torch.rand(B, H) > 0.3).float() / 0.7
    y, none = butterfly_steps.step3(as_pairs(z, dtype), L, torch.float32, scale=0.5, D=D, skip=skip, skip_mask=skip_mask,
                             gelu=gelu, dropout_mask=mask, alloc=poisoned, block_n=4)
    assert none is None and y.shape == (B, H, L) and y.dtype == torch.float32
    c = step3_ref(torch.view_as_complex(as_pairs(z, dtype).double()), L, 0.5)
    c = c + D.double()[:, None] * skip.double() * skip_mask.double()[..., None]
    want = (torch.nn.functional.gelu(c) if gelu else c) * mask.double()[..., None]
    assert rel_err(y, want) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("n1,n2,L", SPLITS)
@pytest.mark.parametrize("gelu", [False, True])
def test_step3_grad_mode(n1, n2, L, gelu):
    """grad mode: dc = dy * mask * gelu'(c) (float32) and dD = sum dc * skip per channel."""
    interpreter_only()
    B, H = 2, 3
    z = torch.randn(B, H, n1, n2, dtype=torch.complex128)
    u, D, dy = torch.randn(B, H, L), torch.randn(H), torch.randn(B, L, H).transpose(1, 2)
    mask = (torch.rand(B, H) > 0.3).float() / 0.7
    dc, dD = butterfly_steps.step3(as_pairs(z, torch.float32), L, torch.float32, scale=1 / n1, D=D, skip=u, gelu=gelu,
                            dropout_mask=mask, grad_y=dy, alloc=poisoned, block_n=4)
    c = step3_ref(z, L, 1 / n1) + D.double()[:, None] * u.double()
    c.requires_grad_(True)
    torch.autograd.backward(torch.nn.functional.gelu(c) if gelu else c, dy.double())
    want = c.grad * mask.double()[..., None]
    assert rel_err(dc, want) < 1e-6
    assert sum_err(dD, (want * u.double()).sum((0, 2)), (want * u.double()).abs().sum((0, 2))) < 1e-6


def test_blocks():
    assert butterfly_steps.blocks_for(4, 8192, "fp16")[:3] == (16, 128, 16)  # padded to sm_90's 16
    assert butterfly_steps.blocks_for(128, 8192, "fp16")[:3] == (64, 64, 64)  # chunked
    assert butterfly_steps.blocks_for(128, 2048, "tf32x3")[:3] == (64, 32, 64)
    assert butterfly_steps.blocks_for(256, 8192, "fp16")[:3] == (256, 16, 16)  # two-level: all of N1
    assert butterfly_steps.blocks_for(1024, 8192, "fp16")[:3] == (1024, 4, 16)
    assert butterfly_steps.blocks_for(1024, 2048, "tf32x3")[:3] == (1024, 4, 16)
    assert butterfly_steps.blocks_for(2048, 2048, "tf32x3")[:3] == (64, 32, 64)  # too large for two levels


# ------------------------------------------------------------------------------- on a GPU -----
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n1,n2", [(16, 8192), (256, 8192), (512, 8192), (1024, 8192), (1024, 2048), (64, 2048)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_steps(n1, n2, dtype):
    B, H, L = 1, 2, n1 * n2 // 2 + 3
    x = torch.randn(B, H, L, device="cuda")
    z, unused = butterfly_steps.step1(x, (n1, n2), dtype, alloc=poisoned)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert rel_err(z.cpu(), torch.view_as_real(step1_ref(x.cpu(), n1, n2))) < tol
    mask = torch.tensor([[1.0, 0.0]], device="cuda")
    dy = torch.randn(B, H, L, device="cuda")
    for grad in (False, True):
        y, unused = butterfly_steps.step3(z, L, torch.float32, scale=1 / n1, D=torch.randn(H, device="cuda"), skip=x,
                                   gelu=True, dropout_mask=mask, grad_y=dy if grad else None, alloc=poisoned)
        assert not torch.isnan(y).any()
    y, unused = butterfly_steps.step3(z, L, torch.float32, scale=1 / n1, alloc=poisoned)
    assert rel_err(y, x) < tol  # step 3 inverts step 1
