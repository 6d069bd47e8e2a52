"""kernels/flashbutterfly.py under the Triton interpreter (CPU) at small N (N1 = 4, N2 = 16 and
others): K1, K3 and their backward kernels against the reference, outputs poisoned with NaN.
Step 2 runs through TorchFFTRowsConvNotFinal (torch.fft), the stand-in for the v5 kernel."""

import math

import pytest
import torch

from lcconv_compile import reference
from lcconv_compile.kernels import FAMILIES, flashbutterfly as fb
from inputs import rel_err
from test_kernels import poisoned

ROWS_CONV = fb.TorchFFTRowsConvNotFinal()
SMALL = fb.Tuning(block_c=4, rows_per_program=4, row_groups=2)  # several programs on both axes


def make_args(B, H, L, Lk, n1, n2, dtype=torch.float32, options=True, exact=False):
    if exact:
        in_f, out_f = reference.butterfly_exact_factors(n1 * n2, torch.float32, split=(n1, n2))
    else:
        in_f, out_f = torch.randn(n2, n1, n1, 2), torch.randn(n2, n1, n1, 2) / n1
    args = dict(u=torch.randn(B, H, L).to(dtype), k=torch.randn(H, Lk) / math.sqrt(Lk), in_factor=in_f, out_factor=out_f)
    if options:
        mask = (torch.rand(B, H) > 0.25).float() / 0.75
        mask[0, 0] = 1 / 0.75
        args.update(D=torch.randn(H), gelu=True, dropout_mask=mask)
    return args


def as_float64(args):
    return {n: v.double() if isinstance(v, torch.Tensor) else v for n, v in args.items()}


def assert_written(*tensors):
    for t in tensors:
        if t is not None:
            assert not torch.isnan(t).any(), "kernel left output elements unwritten"


# ------------------------------------------------------------------------------------- steps --
@pytest.mark.parametrize("n1,n2,L", [(4, 16, 33), (16, 16, 100), (1, 16, 9), (4, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_k1_is_step1(n1, n2, L, dtype):
    args = make_args(2, 3, L, 1, n1, n2, dtype, options=False)
    z = fb.k1_forward(args["u"], args["in_factor"], alloc=poisoned, tuning=fb.Tuning(block_c=min(4, n2), rows_per_program=4))
    assert z.shape == (2, 3, n1, n2, 2) and z.dtype == fb.intermediate_dtype(dtype)
    assert_written(z)
    x = reference.butterfly_columns(args["u"], n1, n2, torch.float64)
    want = reference.butterfly_step1(x, torch.view_as_complex(args["in_factor"].double()))
    assert rel_err(z, torch.view_as_real(want)) < (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("options", [False, True])
def test_k3_is_step3_and_the_epilogue(options):
    n1, n2, L = 4, 16, 37
    args = make_args(3, 2, L, 1, n1, n2, options=options)
    w = torch.randn(3, 2, n1, n2, 2)
    y = fb.k3_forward(w, args["u"], args["out_factor"], args.get("D"), args.get("gelu", False),
                      args.get("dropout_mask"), alloc=poisoned, tuning=SMALL)
    assert_written(y)
    a = as_float64(args)
    c = reference.butterfly_step3(torch.view_as_complex(w.double()), torch.view_as_complex(a["out_factor"]))
    c = c.real.reshape(3, 2, n1 * n2)[..., :L]
    if options:
        c = torch.nn.functional.gelu(c + a["D"][:, None] * a["u"]) * a["dropout_mask"][..., None]
    assert rel_err(y, c) < 1e-6


# ------------------------------------------------------------------------------ three steps --
@pytest.mark.parametrize("n1,n2,L,Lk", [(4, 16, 33, 20), (4, 16, 64, 1), (16, 16, 100, 100), (8, 8, 30, 30)])
@pytest.mark.parametrize("options", [False, True])
def test_forward_equals_reference(n1, n2, L, Lk, options):
    args = make_args(2, 3, L, Lk, n1, n2, options=options)
    y = fb.butterfly_conv_fwd(**args, rows_conv=ROWS_CONV, alloc=poisoned, tuning=SMALL)
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert_written(y)
    assert rel_err(y, reference.butterfly_conv_ref(**as_float64(args))) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs_use_float16_intermediates(dtype, tol):
    args = make_args(2, 3, 33, 20, 4, 16, dtype)
    y = fb.butterfly_conv_fwd(**args, rows_conv=ROWS_CONV, alloc=poisoned, tuning=SMALL)
    assert y.dtype == dtype
    assert rel_err(y, reference.butterfly_conv_ref(**as_float64(args))) < tol


def test_exact_factors_are_the_causal_convolution():
    args = make_args(2, 3, 40, 25, 4, 16, exact=True)
    y = fb.butterfly_conv_fwd(**args, rows_conv=ROWS_CONV, alloc=poisoned, tuning=SMALL)
    plain = {n: v for n, v in as_float64(args).items() if n not in ("in_factor", "out_factor")}
    assert rel_err(y, reference.fftconv_ref(**plain)) < 1e-5


@pytest.mark.parametrize("n1,n2,L,Lk", [(4, 16, 33, 20), (16, 16, 100, 60), (2, 16, 17, 5)])
@pytest.mark.parametrize("options", [False, True])
@pytest.mark.parametrize("row_groups", [1, 5])
def test_backward_equals_reference_and_is_deterministic(n1, n2, L, Lk, options, row_groups):
    B, H = 3, 2
    args = make_args(B, H, L, Lk, n1, n2, options=options)
    grad_y = torch.randn(B, L, H).transpose(1, 2)  # non-contiguous
    tuning = fb.Tuning(block_c=4, row_groups=row_groups)
    got = fb.butterfly_conv_bwd(grad_y, **args, rows_conv=ROWS_CONV, alloc=poisoned, tuning=tuning)
    again = fb.butterfly_conv_bwd(grad_y, **args, rows_conv=ROWS_CONV, alloc=poisoned, tuning=tuning)
    want = reference.butterfly_conv_bwd_ref(grad_y.double(), **as_float64(args))
    assert (got.dD is None) == (not options)
    inputs = dict(du="u", dk="k", d_in_factor="in_factor", d_out_factor="out_factor", dD="D")
    for name, g, g2, w in zip(got._fields, got, again, want):
        if w is None:
            continue
        assert g.shape == w.shape and g.dtype == args[inputs[name]].dtype, name
        assert_written(g)
        assert torch.equal(g, g2), f"{name} differs between identical runs"
        assert rel_err(g, w) < 1e-5, name


def test_non_contiguous_u():
    args = make_args(2, 3, 33, 20, 4, 16)
    args["u"] = torch.randn(2, 33, 3).transpose(1, 2)
    y = fb.butterfly_conv_fwd(**args, rows_conv=ROWS_CONV, alloc=poisoned, tuning=SMALL)
    assert rel_err(y, reference.butterfly_conv_ref(**as_float64(args))) < 1e-5


def test_not_a_dispatch_family_yet():
    """Status guard: step 2 is still torch.fft, so select() must never route the op here."""
    assert fb not in FAMILIES
