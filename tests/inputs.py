"""Random inputs and error measures shared by the tests (fresh random data, never zeros)."""

import math

import torch


def random_args(B, H, L, Lk, dtype=torch.float64, options=True, device="cpu", k_dtype=None):
    """Arguments of fftconv as a dict: u, k (scaled so outputs stay O(1)), D, and with
    ``options`` both gates, GELU and a binary dropout mask (never all dropped)."""

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device=device).to(dt)

    k_dtype = k_dtype or dtype
    args = dict(u=rand(B, H, L), k=rand(H, Lk, dt=k_dtype) / math.sqrt(Lk), D=rand(H, dt=k_dtype))
    if options:
        mask = (torch.rand(B, H, device=device) > 0.25).to(dtype) / 0.75
        if mask.numel():
            mask[0, 0] = 1 / 0.75  # an all-zero mask would make every gradient vanish
        args.update(gate_in=rand(B, H, L), gate_out=rand(B, H, L), gelu=True, dropout_mask=mask)
    return args


def as_float64(args):
    return {n: v.double() if isinstance(v, torch.Tensor) else v for n, v in args.items()}


def rel_err(got, want):
    """||got - want|| / ||want|| in float64."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def sum_err(got, want, abs_terms):
    """Error of a reduction (e.g. dD = sum over b, l of dc * u) against the sum of its terms'
    magnitudes, element by element, the largest one. A sum whose terms cancel (small result, large
    terms) carries rounding of the terms' size, which rel_err would call an error."""
    err = (got.double() - want.double()).abs() / abs_terms.double().clamp_min(1e-300)
    return err.max().item()


def poisoned(shape, dtype, device):
    """An ``alloc=`` for kernel launchers: outputs start as NaN, so an unwritten element shows."""
    return torch.full(shape, math.nan, dtype=dtype, device=device)
