"""kernels.select, the one dispatch point: the op's forward and backward always agree on it."""

import types

import pytest
import torch

import lcconv_compile.kernels as kernels
from inputs import random_args, rel_err
from lcconv_compile import fftconv, reference


def recording_family(claimed_length):
    """A kernel family that claims inputs of one length and computes them with the reference."""
    calls = []

    def fftconv_fwd(*args):
        calls.append("forward")
        return reference.fftconv_ref(*args)

    def fftconv_bwd(*args):
        calls.append("backward")
        return reference.fftconv_bwd_ref(*args)

    family = types.SimpleNamespace(
        supports=lambda u, k: u.shape[-1] == claimed_length,
        fftconv_fwd=fftconv_fwd,
        fftconv_bwd=fftconv_bwd,
    )
    return family, calls


@pytest.mark.parametrize("seqlen, claimed", [(12, True), (13, False)])
def test_forward_and_backward_take_the_same_family(monkeypatch, seqlen, claimed):
    family, calls = recording_family(claimed_length=12)
    monkeypatch.setattr(kernels, "FAMILIES", (family,) + kernels.FAMILIES)
    args = random_args(2, 3, seqlen, 5)
    leaves = {name: t.requires_grad_() for name, t in args.items() if isinstance(t, torch.Tensor)}
    y = fftconv(args["u"], args["k"], args["D"], gate_in=args["gate_in"], gate_out=args["gate_out"],
                gelu=args["gelu"], dropout_mask=args["dropout_mask"].detach())
    y.backward(torch.randn_like(y))
    assert calls == (["forward", "backward"] if claimed else [])
    want = reference.fftconv_ref(**{n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in args.items()})
    assert rel_err(y, want) < 1e-12
    assert all(leaves[name].grad is not None for name in ("u", "k", "D", "gate_in", "gate_out"))


def test_first_family_that_supports_wins(monkeypatch):
    first, _ = recording_family(claimed_length=8)
    second, _ = recording_family(claimed_length=8)
    monkeypatch.setattr(kernels, "FAMILIES", (first, second))
    u, k = torch.randn(1, 2, 8), torch.randn(2, 3)
    assert kernels.select(u, k) is first
    assert kernels.select(torch.randn(1, 2, 9), k) is None


def test_cpu_and_float64_inputs_select_no_kernel():
    u, k = torch.randn(2, 3, 16), torch.randn(3, 16)
    assert kernels.select(u, k) is None
    assert kernels.select(u.double(), k.double()) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (families claim CUDA tensors)")
def test_short_kernels_take_the_short_family_and_long_ones_the_fft():
    from lcconv_compile.kernels import blockfft_conv, shortconv

    u = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    assert kernels.select(u, torch.randn(3, 4, device="cuda")) is shortconv
    assert kernels.select(u, torch.randn(3, 1024, device="cuda")) is blockfft_conv


@pytest.mark.parametrize("shape", [(0, 3, 12), (2, 0, 12)])
def test_kernels_never_see_empty_inputs(monkeypatch, shape):
    family, calls = recording_family(claimed_length=12)
    monkeypatch.setattr(kernels, "FAMILIES", (family,) + kernels.FAMILIES)
    u = torch.randn(*shape, requires_grad=True)
    k = torch.randn(shape[1], 5, requires_grad=True)
    y = fftconv(u, k)
    y.sum().backward()
    assert calls == [] and y.shape == shape
    assert u.grad.shape == shape and torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("channels, family_name", [(64, "flashbutterfly"), (768, None)])
def test_inputs_past_32_bit_offsets_go_to_the_reference(channels, family_name):
    """(1, 768, 1M) bf16: FlashButterfly's intermediate (B, H, N1, N2, 2) holds 3.2e9 numbers, past
    what its 32-bit offsets index (it faulted on the H100): the op runs the reference instead.
    (1, 64, 1M) still dispatches. Fake CUDA tensors: no GPU and no memory needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        u = torch.empty(1, channels, 2**20, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(channels, 2**20, dtype=torch.float32, device="cuda")
        family = kernels.select(u, k)
    assert getattr(family, "__name__", "None").rsplit(".", 1)[-1] == (family_name or "None")


@pytest.mark.parametrize("family_name, shape, kernel_len", [("blockfft_conv", (64, 4096, 8192), 8192),
                                                            ("shortconv", (64, 4096, 8192), 4)])
def test_on_chip_families_refuse_2_31_elements(family_name, shape, kernel_len):
    """u of exactly 2^31 elements is refused, one batch row fewer is taken."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    family = importlib.import_module(f"lcconv_compile.kernels.{family_name}")
    with FakeTensorMode(allow_non_fake_inputs=False):
        u = torch.empty(*shape, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(shape[1], kernel_len, dtype=torch.float32, device="cuda")
        small = torch.empty(shape[0] - 1, *shape[1:], dtype=torch.bfloat16, device="cuda")
        assert not family.supports(u, k)
        assert family.supports(small, k)
