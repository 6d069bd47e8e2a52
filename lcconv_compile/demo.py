"""The README's main job: build a tiny long-convolution model, run it eagerly and under
``torch.compile``, and show that both agree (forward and gradients); then show the compiler
rewriting a hand-written FFT convolution into the op (``lcconv_compile.explain``).

Run with ``make demo`` (or ``python -m lcconv_compile.demo``). Uses CUDA when available.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import lcconv_compile
from lcconv_compile import fftconv


class TinyLongConvBlock(nn.Module):
    """Pre-norm residual block: LayerNorm -> long convolution (our op) with a GELU -> Linear."""

    def __init__(self, d_model: int, l_max: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.kernel = nn.Parameter(torch.randn(d_model, l_max) * torch.exp(-torch.arange(l_max) / 32.0))
        self.skip = nn.Parameter(torch.randn(d_model))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, d_model)
        u = self.norm(x).transpose(1, 2)  # (B, H, L)
        y = fftconv(u, self.kernel[:, : u.shape[-1]], self.skip, gelu=True)
        return x + self.out(y.transpose(1, 2))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(*[TinyLongConvBlock(32, 256) for _ in range(2)]).to(device)
    x = torch.randn(4, 256, 32, device=device)
    print(f"lcconv-compile demo on {device}, torch {torch.__version__}: 2 blocks, x {tuple(x.shape)}")

    y_eager = model(x)
    y_eager.square().mean().backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    y_compiled = compiled(x)
    y_compiled.square().mean().backward()
    print(f"compiled in {time.perf_counter() - start:.1f} s")
    grads_compiled = [p.grad for p in model.parameters()]

    out_err = (y_compiled - y_eager).abs().max().item()
    grad_err = max((a - b).abs().max().item() for a, b in zip(grads_compiled, grads_eager))
    print(f"max |compiled - eager|: output {out_err:.2e}, gradients {grad_err:.2e}")
    if out_err > 1e-4 or grad_err > 1e-4:
        raise SystemExit("eager and compiled DISAGREE")
    print("eager and torch.compile agree")

    # The same convolution written by hand with torch.fft: the compiler finds it and uses the op.
    def hand_written_mixer(u, k, D):
        n = 2 * u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., : u.shape[-1]]
        return torch.nn.functional.gelu(y + u * D.unsqueeze(-1))

    u, k, D = torch.randn(2, 8, 64, device=device), torch.randn(8, 64, device=device), torch.randn(8, device=device)
    print()
    print(lcconv_compile.explain(hand_written_mixer, u, k, D))


if __name__ == "__main__":
    main()
