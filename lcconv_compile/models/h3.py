"""``H3``: the Hungry Hungry Hippos mixer (seed 001), with its recurrent ``step`` beside the forward.

For input x (B, L, d_model), with ``H = d_model // head_dim`` heads of ``head_dim`` channels::

    q, k, v = Wq x, Wk x, Wv x
    k       = shift_conv(k) + shift_D * k             shift SSM: a learned causal FIR of shift_len taps
    kv      = k (outer) v per head                    (B, H, head_dim, head_dim, L); head_dim=1: k * v
    s       = diag_conv(kv) + D * kv                  diagonal SSM, one kernel per head
    y       = sum_i q_i * s_ij  per head              multiplicative interaction (head_dim=1: q * s)
    out     = Wo y

Diagonal SSM (S4D, zero-order hold): per head h and state n (``d_state/2`` complex modes, each
standing for a conjugate pair), ``A = -exp(log_A_real) + i A_imag``, ``dt = exp(log_dt)``,
``A_bar = exp(dt A)``, ``B_bar = (exp(dt A) - 1) / A * B``, and the kernel is the Vandermonde product
``K[l] = 2 Re(sum_n C_n B_bar_n A_bar_n^l)``. It is computed here in real arithmetic
(``exp(dt A l) = exp(Re l) (cos(Im l) + i sin(Im l))``) so that ``torch.compile`` sees only real ops.

Both convolutions go through ``lcconv_compile.fftconv``. With ``head_dim == 1`` the gating is fused
into the op: ``fftconv(v, K, D, gate_in=k, gate_out=q)`` is exactly ``q * (conv(k*v) + D*k*v)``.

``step`` runs the same layer as a recurrence for generation, O(1) work per token: a shift register
of the last ``shift_len - 1`` k values and the complex diagonal state ``x <- A_bar x + B_bar kv``.
It must stay equal to the forward token by token (tests check it in float64).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcconv_compile import fftconv

from ._common import apply_key_padding, check_choice, check_divisible, check_positive, check_seqlen

__all__ = ["H3", "H3State"]


class H3State(NamedTuple):
    """Recurrent state of one H3 layer for a batch.

    shift: ``(B, d_model, shift_len - 1)`` the previous k projections, newest last.
    ssm:   ``(B, H, head_dim, head_dim, d_state // 2)`` complex diagonal-SSM state.
    """

    shift: Tensor
    ssm: Tensor


class H3(nn.Module):
    """H3 mixer; ``forward`` maps ``(B, L, d_model)`` to ``(B, L, d_model)`` for ``L <= l_max``.

    Args:
        d_model: channels; must be divisible by ``head_dim``.
        l_max: longest sequence the convolutional forward accepts (``step`` has no limit).
        head_dim: channels per head; head_dim > 1 uses H3's outer-product heads.
        d_state: diagonal-SSM state size N (N/2 complex modes); must be even.
        shift_len: taps of the shift SSM's FIR filter (its state size).
        dt_min, dt_max: range of the initial step sizes (log-uniform).
        ssm_init: ``"lin"`` (S4D-Lin, ``A_n = -1/2 + i pi n``: oscillating modes, as the H3 paper) or
            ``"real"`` (S4D-Real, ``A_n = -(n+1)``: smooth decaying kernels).
    """

    def __init__(
        self,
        d_model: int,
        l_max: int,
        *,
        head_dim: int = 1,
        d_state: int = 64,
        shift_len: int = 4,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        ssm_init: str = "lin",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_positive("H3", d_model=d_model, l_max=l_max, d_state=d_state, shift_len=shift_len)
        check_divisible("H3", d_model, "head_dim", head_dim)
        if d_state % 2:
            raise ValueError(f"H3: d_state must be even (N/2 complex conjugate pairs), got {d_state}")
        check_choice("H3", "ssm_init", ssm_init, ("lin", "real"))
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"H3: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.l_max, self.head_dim = d_model, l_max, head_dim
        self.n_heads = d_model // head_dim
        self.d_state, self.shift_len = d_state, shift_len
        modes = d_state // 2

        self.q_proj = nn.Linear(d_model, d_model, **factory)
        self.k_proj = nn.Linear(d_model, d_model, **factory)
        self.v_proj = nn.Linear(d_model, d_model, **factory)
        self.out_proj = nn.Linear(d_model, d_model, **factory)

        # Shift SSM: the FIR taps are the SSM's C (its A is the shift matrix, B = e_0).
        self.shift_kernel = nn.Parameter(torch.randn(d_model, shift_len, **factory) / math.sqrt(shift_len))
        self.shift_D = nn.Parameter(torch.randn(d_model, **factory))

        # Diagonal SSM. S4D-Lin: A_n = -1/2 + i*pi*n; S4D-Real: A_n = -(n+1). B = 1, C ~ CN(0, 1).
        heads = self.n_heads
        log_dt = torch.rand(heads, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        n = torch.arange(modes, device=device, dtype=dtype or torch.get_default_dtype()).repeat(heads, 1)
        if ssm_init == "lin":
            a_real, a_imag = torch.full_like(n, 0.5), math.pi * n
        else:
            a_real, a_imag = n + 1, torch.zeros_like(n)
        self.log_A_real = nn.Parameter(torch.log(a_real))
        self.A_imag = nn.Parameter(a_imag)
        self.B = nn.Parameter(torch.stack([torch.ones(heads, modes, **factory), torch.zeros(heads, modes, **factory)], -1))
        self.C = nn.Parameter(torch.randn(heads, modes, 2, **factory) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(heads, **factory))

    @property
    def is_causal(self) -> bool:
        return True

    # ----------------------------------------------------------------------- diagonal SSM --
    def _discretised(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Real and imaginary parts of ``dt*A`` and of ``W = C * B_bar``, each ``(H, N/2)``."""
        dt = torch.exp(self.log_dt).unsqueeze(-1)
        a_re, a_im = -torch.exp(self.log_A_real), self.A_imag
        dta_re, dta_im = dt * a_re, dt * a_im
        # exp(dt A) - 1
        growth = torch.exp(dta_re)
        e_re, e_im = growth * torch.cos(dta_im) - 1.0, growth * torch.sin(dta_im)
        # (exp(dt A) - 1) / A: multiply by conj(A) / |A|^2
        a_abs2 = a_re * a_re + a_im * a_im
        f_re = (e_re * a_re + e_im * a_im) / a_abs2
        f_im = (e_im * a_re - e_re * a_im) / a_abs2
        # B_bar = f * B, then W = C * B_bar
        b_re, b_im = self.B.unbind(-1)
        bb_re, bb_im = f_re * b_re - f_im * b_im, f_re * b_im + f_im * b_re
        c_re, c_im = self.C.unbind(-1)
        w_re, w_im = c_re * bb_re - c_im * bb_im, c_re * bb_im + c_im * bb_re
        return dta_re, dta_im, w_re, w_im

    def ssm_kernel(self, seqlen: int) -> Tensor:
        """The diagonal SSM's kernel ``K[h, l] = 2 Re(sum_n W_n exp(dt A_n l))``, shape ``(H, seqlen)``."""
        dta_re, dta_im, w_re, w_im = self._discretised()
        steps = torch.arange(seqlen, device=dta_re.device, dtype=dta_re.dtype)
        decay = torch.exp(dta_re.unsqueeze(-1) * steps)  # (H, N/2, L)
        phase = dta_im.unsqueeze(-1) * steps
        terms = decay * (w_re.unsqueeze(-1) * torch.cos(phase) - w_im.unsqueeze(-1) * torch.sin(phase))
        return 2.0 * terms.sum(dim=1)

    # ------------------------------------------------------------------------ parallel form --
    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x``: ``(B, L, d_model)``; ``key_padding_mask``: optional ``(B, L)`` bool, True = padding.

        Padded positions get zero k and v, so they add nothing to the state seen by other positions.
        """
        seqlen = check_seqlen("H3", x, self.d_model, self.l_max)
        batch, heads, hd = x.shape[0], self.n_heads, self.head_dim
        q = self.q_proj(x).transpose(1, 2)
        k = apply_key_padding(self.k_proj(x), key_padding_mask).transpose(1, 2)
        v = apply_key_padding(self.v_proj(x), key_padding_mask).transpose(1, 2)  # (B, d_model, L)

        shift_taps = self.shift_kernel[:, : min(self.shift_len, seqlen)]
        k = fftconv(k, shift_taps, self.shift_D)
        ssm_kernel = self.ssm_kernel(seqlen)  # (H, L)
        if hd == 1:
            y = fftconv(v, ssm_kernel, self.D, gate_in=k, gate_out=q)
        else:
            # Outer-product heads: channel (h, i, j) carries k_{h,i} * v_{h,j}; all share head h's kernel.
            kv = k.view(batch, heads, hd, 1, seqlen) * v.view(batch, heads, 1, hd, seqlen)
            pairs = hd * hd
            kernel = ssm_kernel.unsqueeze(1).expand(heads, pairs, seqlen).reshape(heads * pairs, seqlen)
            skip = self.D.unsqueeze(1).expand(heads, pairs).reshape(heads * pairs)
            s = fftconv(kv.reshape(batch, heads * pairs, seqlen), kernel, skip)
            s = s.view(batch, heads, hd, hd, seqlen)
            y = (q.view(batch, heads, hd, 1, seqlen) * s).sum(dim=2).reshape(batch, self.d_model, seqlen)
        return self.out_proj(y.transpose(1, 2).to(x.dtype))

    # ----------------------------------------------------------------------- recurrent form --
    def allocate_state(self, batch_size: int, *, device=None, dtype=None) -> H3State:
        """The zero state before the first token (dtype: the real dtype of the parameters)."""
        real = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        complex_dtype = torch.complex128 if real == torch.float64 else torch.complex64
        shift = torch.zeros(batch_size, self.d_model, self.shift_len - 1, device=device, dtype=real)
        ssm = torch.zeros(
            batch_size, self.n_heads, self.head_dim, self.head_dim, self.d_state // 2,
            device=device, dtype=complex_dtype,
        )
        return H3State(shift, ssm)

    def step(self, x_t: Tensor, state: H3State) -> tuple[Tensor, H3State]:
        """One token: ``x_t`` ``(B, d_model)`` -> ``(y_t (B, d_model), next state)``; O(1) in the position."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"H3.step: expected x_t of shape (B, d_model={self.d_model}), got {tuple(x_t.shape)}")
        batch, heads, hd = x_t.shape[0], self.n_heads, self.head_dim
        q, k, v = self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)

        # Shift SSM: taps[0] meets the current k, taps[j] the k of j steps ago.
        history = torch.cat([state.shift, k.unsqueeze(-1)], dim=-1)  # oldest .. newest
        k_shifted = (history * self.shift_kernel.flip(-1)).sum(-1) + self.shift_D * k
        next_shift = history[..., 1:]

        # Diagonal SSM on k (outer) v.
        dta_re, dta_im, _, _ = self._discretised()
        a_bar = torch.exp(torch.complex(dta_re, dta_im))  # (H, N/2)
        b_bar = self._b_bar()
        c = torch.view_as_complex(self.C.contiguous())
        kv = k_shifted.view(batch, heads, hd, 1) * v.view(batch, heads, 1, hd)
        next_ssm = a_bar.view(1, heads, 1, 1, -1) * state.ssm + b_bar.view(1, heads, 1, 1, -1) * kv.unsqueeze(-1)
        s = 2.0 * (next_ssm * c.view(1, heads, 1, 1, -1)).sum(-1).real + self.D.view(1, heads, 1, 1) * kv
        y = (q.view(batch, heads, hd, 1) * s).sum(dim=2).reshape(batch, self.d_model)
        return self.out_proj(y.to(x_t.dtype)), H3State(next_shift, next_ssm)

    def _b_bar(self) -> Tensor:
        """``B_bar = (exp(dt A) - 1) / A * B`` as a complex ``(H, N/2)`` tensor (for ``step``)."""
        dt = torch.exp(self.log_dt).unsqueeze(-1)
        a = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        return (torch.exp(dt * a) - 1.0) / a * torch.view_as_complex(self.B.contiguous())

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, l_max={self.l_max}, head_dim={self.head_dim}, "
            f"d_state={self.d_state}, shift_len={self.shift_len}"
        )
