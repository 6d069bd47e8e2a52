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
``K[l] = 2 Re(sum_n C_n B_bar_n A_bar_n^l)``. It is computed in real arithmetic (``torch.compile``
sees only real ops) and without the ``(H, N/2, L)`` Vandermonde matrix: with ``l = c*T + j`` (chunks
of T ~ sqrt(l_max) taps, sqrt(L) without l_max), ``A_bar^l = A_bar^(cT) A_bar^j``, so the kernel
is one batched matrix product ``(H, L/T, N/2) @ (H, N/2, T)`` whose factors hold
``O(H N (L/T + T))`` numbers (real part of a complex product: two real products, stacked into
one). T depends on l_max, not L, so one compiled graph serves every length. Autocast is off there: a bfloat16 Vandermonde
product would lose the kernel's long tail.

``kernel="longconv"`` (seed 000's language-model setting) replaces the diagonal SSM's kernel by a
directly learned ``(H, l_max)`` kernel with Squash, Smooth and kernel dropout: the parametrisation
of :class:`~lcconv_compile.models.LongConv` (its functions, not a copy). That layer needs ``l_max``
and has no recurrent ``step``.

The projections are written channels-first (``_projections``: on CUDA, batched products that
give q, k, v as contiguous ``(B, d_model, L)``, the layout the op's kernels read), so no
transposed view of an ``nn.Linear`` output reaches the op. Both convolutions go through
``lcconv_compile.fftconv`` (via ``_conv.long_conv``, which benchmarks can route through the
reference math). The shift SSM passes its ``shift_len`` taps as a short
kernel (never zero-padded to L: the op picks its short-kernel path). With ``head_dim == 1`` the
gating is fused into the op: ``fftconv(v, K, D, gate_in=k, gate_out=q)`` is exactly
``q * (conv(k*v) + D*k*v)``. With ``head_dim > 1`` the ``(B, H*head_dim^2, L)`` outer product is
materialised: the op's ``(B, channels, L)`` form cannot express two stride-0 broadcasts over one
channel axis, so fusing the outer product (as the H3 CUDA kernel does) needs a kernel of its own.

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

from ._common import check_choice, check_divisible, check_positive, check_seqlen
from ._conv import long_conv
from ._projections import project_in, project_out
from .longconv import check_kernel_options, init_kernel_weight, regularised_kernel
from .ssm_chunks import state_output, state_update, vandermonde_piece

__all__ = ["H3", "H3State", "vandermonde_chunk"]

KERNELS = ("ssm", "longconv")
# Options of each kernel and their defaults; an option of the other kernel is refused.
SSM_OPTIONS = {"d_state": 64, "dt_min": 1e-3, "dt_max": 1e-1, "ssm_init": "lin", "c_scale": 1.0}
LONGCONV_OPTIONS = {
    "squash_lambda": 1e-3, "smooth_radius": 0, "kernel_dropout": 0.0, "kernel_init": "geometric", "kernel_std": 0.02,
}


# Chunk for a symbolic length without l_max (torch.export with a dynamic L): sqrt(L) would
# specialise L to the example's value, so a fixed chunk is used; the memory bound O(H*N*sqrt(L))
# then holds for L up to SYMBOLIC_CHUNK**2 and grows as O(H*N*L/SYMBOLIC_CHUNK) beyond.
SYMBOLIC_CHUNK = 64


def vandermonde_chunk(seqlen: int, l_max: Optional[int] = None) -> int:
    """Taps per chunk of the SSM kernel: the power of two at or above sqrt(l_max), or sqrt(seqlen)
    for a layer without l_max.

    With l_max the chunk does not depend on L, so one compiled graph serves every length
    (``torch.compile(dynamic=True)``, or a second length under automatic dynamic shapes) and eager,
    compiled and exported layers compute the kernel alike; its factors hold O(H*N*sqrt(l_max))
    numbers at any L <= l_max. Without l_max, a symbolic L (which under Dynamo looks like an int)
    gets one graph per band ``4^(e-1) < L <= 4^e`` (see ``vandermonde_piece``).
    """
    if l_max is not None:
        return vandermonde_piece(l_max)
    if isinstance(seqlen, torch.SymInt):
        return SYMBOLIC_CHUNK
    return vandermonde_piece(seqlen)


class H3State(NamedTuple):
    """Recurrent state of one H3 layer for a batch.

    shift: ``(B, d_model, shift_len - 1)`` the previous k projections, newest last.
    ssm:   ``(B, H, head_dim, head_dim, d_state // 2)`` complex diagonal-SSM state.
    """

    shift: Tensor
    ssm: Tensor


class H3(nn.Module):
    """H3 mixer; ``forward`` maps ``(B, L, d_model)`` to ``(B, L, d_model)``.

    Args:
        d_model: channels; must be divisible by ``head_dim``.
        l_max: optional longest sequence. With the SSM kernel it is only checked (the kernel is
            generated for whatever L arrives; ``step`` has no limit); ``kernel="longconv"`` needs it
            (the learned kernel's length).
        head_dim: channels per head; head_dim > 1 uses H3's outer-product heads.
        kernel: ``"ssm"`` (S4D diagonal SSM, the paper's H3) or ``"longconv"`` (a learned long
            kernel per head with Squash and Smooth, seed 000).
        shift_len: taps of the shift SSM's FIR filter (its state size).
        state_chunk: with the SSM kernel, sequences longer than this run through :meth:`prefill`
            (chunks of ``state_chunk`` with the SSM state passed between them: no convolution,
            FFT or kernel longer than a chunk). None (default): one full-length convolution.

    Options of ``kernel="ssm"``:
        d_state: diagonal-SSM state size N (N/2 complex modes); must be even. Default 64.
        dt_min, dt_max: range of the initial step sizes (log-uniform). Default 1e-3, 1e-1.
        ssm_init: ``"lin"`` (S4D-Lin, ``A_n = -1/2 + i pi n``: oscillating modes, as the H3 paper) or
            ``"real"`` (S4D-Real, ``A_n = -(n+1)``: smooth decaying kernels). Default ``"lin"``.
        c_scale: multiplies the initial C (``C ~ c_scale * CN(0, 1)``). The kernel's amplitude is
            about ``dt * |C|``, so the long-memory heads (small dt) start nearly silent; a larger C
            let induction head learn faster at L = 256 on CPU (benchmarks/NOTES.md). Default 1.

    Options of ``kernel="longconv"`` (meaning and defaults as in LongConv): squash_lambda,
    smooth_radius, kernel_dropout, kernel_init, kernel_std.
    """

    def __init__(
        self,
        d_model: int,
        l_max: Optional[int] = None,
        *,
        head_dim: int = 1,
        kernel: str = "ssm",
        shift_len: int = 4,
        state_chunk: Optional[int] = None,
        device=None,
        dtype=None,
        **kernel_options,
    ):
        super().__init__()
        check_positive("H3", d_model=d_model, shift_len=shift_len)
        if l_max is not None:
            check_positive("H3", l_max=l_max)
        check_divisible("H3", d_model, "head_dim", head_dim)
        check_choice("H3", "kernel", kernel, KERNELS)
        if state_chunk is not None:
            check_positive("H3", state_chunk=state_chunk)
            if kernel != "ssm":
                raise ValueError(f"H3: state_chunk needs kernel='ssm' (a finite diagonal state), got kernel={kernel!r}")
        self.state_chunk = state_chunk
        defaults, other = (SSM_OPTIONS, LONGCONV_OPTIONS) if kernel == "ssm" else (LONGCONV_OPTIONS, SSM_OPTIONS)
        for name in kernel_options:
            if name in other:
                raise ValueError(f"H3: option {name!r} belongs to the other kernel; kernel={kernel!r} takes "
                                 f"{', '.join(defaults)}")
            if name not in defaults:
                raise TypeError(f"H3.__init__() got an unexpected keyword argument {name!r}")
        options = {**defaults, **kernel_options}
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.l_max, self.head_dim, self.kernel_type = d_model, l_max, head_dim, kernel
        self.n_heads = d_model // head_dim
        self.shift_len = shift_len

        self.q_proj = nn.Linear(d_model, d_model, **factory)
        self.k_proj = nn.Linear(d_model, d_model, **factory)
        self.v_proj = nn.Linear(d_model, d_model, **factory)
        self.out_proj = nn.Linear(d_model, d_model, **factory)

        # Shift SSM: the FIR taps are the SSM's C (its A is the shift matrix, B = e_0).
        self.shift_kernel = nn.Parameter(torch.randn(d_model, shift_len, **factory) / math.sqrt(shift_len))
        self.shift_D = nn.Parameter(torch.randn(d_model, **factory))
        self.D = nn.Parameter(torch.randn(self.n_heads, **factory))
        if kernel == "ssm":
            self._init_ssm(**options, factory=factory)
        else:
            self._init_longconv(**options, factory=factory)

    def _init_ssm(self, *, d_state, dt_min, dt_max, ssm_init, c_scale, factory) -> None:
        check_positive("H3", d_state=d_state)
        if d_state % 2:
            raise ValueError(f"H3: d_state must be even (N/2 complex conjugate pairs), got {d_state}")
        check_choice("H3", "ssm_init", ssm_init, ("lin", "real"))
        if not c_scale > 0:
            raise ValueError(f"H3: c_scale must be > 0, got {c_scale}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"H3: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_state, self.ssm_init = d_state, ssm_init
        heads, modes = self.n_heads, d_state // 2
        # S4D-Lin: A_n = -1/2 + i*pi*n; S4D-Real: A_n = -(n+1). B = 1, C ~ CN(0, 1).
        log_dt = torch.rand(heads, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        real = factory["dtype"] or torch.get_default_dtype()
        n = torch.arange(modes, device=factory["device"], dtype=real).repeat(heads, 1)
        if ssm_init == "lin":
            a_real, a_imag = torch.full_like(n, 0.5), math.pi * n
        else:
            a_real, a_imag = n + 1, torch.zeros_like(n)
        self.log_A_real = nn.Parameter(torch.log(a_real))
        self.A_imag = nn.Parameter(a_imag)
        self.B = nn.Parameter(torch.stack([torch.ones(heads, modes, **factory), torch.zeros(heads, modes, **factory)], -1))
        self.C = nn.Parameter(torch.randn(heads, modes, 2, **factory) * (c_scale * math.sqrt(0.5)))

    def _init_longconv(self, *, squash_lambda, smooth_radius, kernel_dropout, kernel_init, kernel_std, factory) -> None:
        check_kernel_options(
            "H3(kernel='longconv')", self.l_max, squash_lambda=squash_lambda, smooth_radius=smooth_radius,
            kernel_dropout=kernel_dropout, kernel_init=kernel_init,
        )
        self.squash_lambda, self.smooth_radius, self.kernel_dropout = squash_lambda, smooth_radius, kernel_dropout
        self.kernel_init, self.kernel_std = kernel_init, kernel_std
        self.kernel_weight = nn.Parameter(torch.empty(self.n_heads, self.l_max, **factory))
        init_kernel_weight(self.kernel_weight, kernel_init, kernel_std)

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
        """The diagonal SSM's kernel ``K[h, l] = 2 Re(sum_n W_n exp(dt A_n l))``, shape ``(H, seqlen)``.

        Chunked Vandermonde product (module docstring): peak memory O(H*L + H*N*sqrt(l_max))
        (sqrt(L) without l_max).
        """
        dta_re, dta_im, w_re, w_im = self._discretised()  # (H, M), M = N/2
        chunk = vandermonde_chunk(seqlen, self.l_max)
        n_chunks = -(-seqlen // chunk)
        if isinstance(seqlen, torch.SymInt):
            # One spare chunk: every elementwise op on (H, n_chunks, M) asks whether n_chunks == 1
            # (broadcasting), and torch.export would answer with a guard (L <= chunk or L > chunk);
            # with n_chunks >= 2 provable, it asks nothing.
            n_chunks = n_chunks + 1
        with torch.autocast(device_type=dta_re.device.type, enabled=False):
            inner = torch.arange(chunk, device=dta_re.device, dtype=dta_re.dtype)
            outer = torch.arange(n_chunks, device=dta_re.device, dtype=dta_re.dtype) * chunk
            # Row factor A_bar^(c*T): (H, n_chunks, M). Products through matmul (a K = 1 outer
            # product), not broadcasting: broadcasting a symbolic n_chunks against a size-1 dim
            # makes torch.export guard n_chunks == 1 or != 1, i.e. bound L at the chunk size.
            row_exponent_re = torch.matmul(outer.unsqueeze(-1), dta_re.unsqueeze(1))
            row_phase = torch.matmul(outer.unsqueeze(-1), dta_im.unsqueeze(1))
            row_decay = torch.exp(row_exponent_re)
            row_re, row_im = row_decay * torch.cos(row_phase), row_decay * torch.sin(row_phase)
            # Column factor W * A_bar^j: (H, M, T), of fixed size (W goes here, not in the rows).
            col_decay = torch.exp(dta_re.unsqueeze(-1) * inner)
            col_phase = dta_im.unsqueeze(-1) * inner
            a_re, a_im = col_decay * torch.cos(col_phase), col_decay * torch.sin(col_phase)
            w_re, w_im = w_re.unsqueeze(-1), w_im.unsqueeze(-1)
            col_re, col_im = w_re * a_re - w_im * a_im, w_re * a_im + w_im * a_re
            # Re(row @ col) = row_re @ col_re - row_im @ col_im, as one product over 2M.
            blocks = torch.cat([row_re, -row_im], dim=-1) @ torch.cat([col_re, col_im], dim=1)  # (H, n_chunks, T)
        if isinstance(seqlen, torch.SymInt):
            # Neither a reshape of (n_chunks, chunk) nor a cut view to a symbolic L: both make
            # torch.export guard on L (divisibility, contiguity). A gather of taps 0..L-1 does not.
            taps = torch.arange(seqlen, device=blocks.device)
            return 2.0 * blocks[:, taps // chunk, taps % chunk]
        return 2.0 * blocks.reshape(self.n_heads, n_chunks * chunk)[:, :seqlen]

    def kernel(self, seqlen: int) -> Tensor:
        """The per-head long kernel for a sequence of ``seqlen``: ``(H, seqlen)`` (SSM or learned)."""
        if self.kernel_type == "ssm":
            return self.ssm_kernel(seqlen)
        return regularised_kernel(
            self.kernel_weight, seqlen, smooth_radius=self.smooth_radius, squash_lambda=self.squash_lambda,
            kernel_dropout=self.kernel_dropout, training=self.training,
        )

    # ------------------------------------------------------------------------ parallel form --
    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x``: ``(B, L, d_model)``; ``key_padding_mask``: optional ``(B, L)`` bool, True = padding.

        Padded positions get zero k and v, so they add nothing to the state seen by other positions.
        """
        seqlen = check_seqlen("H3", x, self.d_model, self.l_max)
        if self.state_chunk is not None and not isinstance(seqlen, torch.SymInt) and seqlen > self.state_chunk:
            return self.prefill(x, chunk=self.state_chunk, key_padding_mask=key_padding_mask)[0]
        q, k, v = self._qkv(x, key_padding_mask)
        # The shift SSM's taps as a short kernel (Lk = shift_len): the op's short-kernel path.
        k = self._shift(k, seqlen)
        head_kernel = self.kernel(seqlen)  # (H, L)
        if self.head_dim > 1 and isinstance(seqlen, torch.SymInt):
            y = self._outer_product_heads_by_index(q, k, v, head_kernel)
        else:
            y = self._heads(q, k, v, head_kernel)
        return project_out(self.out_proj, y, x.dtype)

    def _qkv(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v projections as ``(B, d_model, L)``, each contiguous (``_projections``); padded
        positions get zero k and v."""
        q = project_in(self.q_proj, x)
        k = project_in(self.k_proj, x, key_padding_mask)
        v = project_in(self.v_proj, x, key_padding_mask)
        return q, k, v

    def _kv(self, k: Tensor, v: Tensor) -> Tensor:
        """The diagonal SSM's input ``(B, H, hd*hd, L)``: channel ``(h, i, j)`` carries ``k_{h,i} * v_{h,j}``."""
        batch, heads, hd, seqlen = k.shape[0], self.n_heads, self.head_dim, k.shape[-1]
        kv = k.view(batch, heads, hd, 1, seqlen) * v.view(batch, heads, 1, hd, seqlen)
        return kv.reshape(batch, heads, hd * hd, seqlen)

    def _heads(self, q: Tensor, k: Tensor, v: Tensor, head_kernel: Tensor, kv: Optional[Tensor] = None,
               carried: Optional[Tensor] = None) -> Tensor:
        """``y`` ``(B, d_model, L)`` from q, the shifted k and v ``(B, d_model, L)`` and the heads'
        kernel ``(H, L)``: the diagonal SSM's convolution of k (outer) v, plus ``carried``
        ``(B, H, hd*hd, L)`` (earlier chunks' share, see :meth:`prefill`), times q. With
        ``head_dim == 1`` the gates are fused into the op; ``kv`` is ``_kv(k, v)`` when the
        caller has it."""
        batch, heads, hd, seqlen = q.shape[0], self.n_heads, self.head_dim, q.shape[-1]
        if hd == 1:
            y = long_conv(v, head_kernel, self.D, gate_in=k, gate_out=q)
            return y if carried is None else y + q * carried.reshape(batch, heads, seqlen).to(y.dtype)
        # Outer-product heads: every channel (h, i, j) shares head h's kernel and skip weight.
        pairs = hd * hd
        kv = self._kv(k, v) if kv is None else kv
        kernel = head_kernel.unsqueeze(1).expand(heads, pairs, seqlen).reshape(heads * pairs, seqlen)
        skip = self.D.unsqueeze(1).expand(heads, pairs).reshape(heads * pairs)
        s = long_conv(kv.reshape(batch, heads * pairs, seqlen), kernel, skip).view(batch, heads, pairs, seqlen)
        if carried is not None:
            s = s + carried.to(s.dtype)
        s = s.view(batch, heads, hd, hd, seqlen)
        return (q.view(batch, heads, hd, 1, seqlen) * s).sum(dim=2).reshape(batch, self.d_model, seqlen)

    def _outer_product_heads_by_index(self, q: Tensor, k: Tensor, v: Tensor, head_kernel: Tensor) -> Tensor:
        """head_dim > 1 for a symbolic L (torch.export): channel ``(h, i, j)`` gathered by index
        (k_i as the op's input gate, v_j its input, q_i its output gate), summed over ``i`` by
        ``index_add``. The same math as the view/expand form of ``forward``, without views of
        ``(B, H, hd, hd, L)``: torch 2.11 guards ``min(L, 2L, 4L) == L`` in their stride checks,
        which its symbolic shapes cannot prove. It materialises three ``(B, H*hd^2, L)`` inputs."""
        heads, hd = self.n_heads, self.head_dim
        pair = torch.arange(heads * hd * hd, device=q.device)
        head, i, j = pair // (hd * hd), (pair // hd) % hd, pair % hd
        row, col = head * hd + i, head * hd + j  # the channels of k_i / q_i and of v_j
        s = long_conv(v.index_select(1, col), head_kernel.index_select(0, head), self.D.index_select(0, head),
                      gate_in=k.index_select(1, row), gate_out=q.index_select(1, row))
        return torch.zeros_like(q, dtype=s.dtype).index_add(1, col, s)

    def _shift(self, k: Tensor, seqlen) -> Tensor:
        """The shift SSM on ``k`` ``(B, d_model, L)``: its taps as a short kernel, the op's short path."""
        if not isinstance(seqlen, torch.SymInt):
            return long_conv(k, self.shift_kernel[:, : min(self.shift_len, seqlen)], self.shift_D)
        # Symbolic L (torch.export with a dynamic length): cutting the taps to min(shift_len, L)
        # would bound L >= shift_len. Zeros appended after the sequence change no causal output,
        # so all taps run on L + shift_len - 1 samples and the first L outputs are kept.
        padded = F.pad(k, (0, self.shift_len - 1))
        return long_conv(padded, self.shift_kernel, self.shift_D).narrow(2, 0, seqlen)

    # ---------------------------------------------------------------------- state passing --
    def prefill(self, x: Tensor, state: Optional[H3State] = None, *, chunk: int = 4096,
                key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, H3State]:
        """Run the layer over ``x`` ``(B, L, d_model)`` ``chunk`` samples at a time, passing the
        diagonal SSM's state between chunks (module ``ssm_chunks``); returns ``(y, state)``.

        ``y`` equals ``forward(x)`` (from the zero state) and the returned state is the one
        ``step`` would reach after the same tokens, so generation can continue with ``step``; a
        given ``state`` continues a sequence (a prompt prefilled in pieces). No convolution,
        FFT or SSM kernel is longer than ``chunk``, whatever L is. Needs ``kernel="ssm"``.
        """
        self._check_recurrent("prefill")
        check_positive("H3.prefill", chunk=chunk)
        seqlen = check_seqlen("H3", x, self.d_model, None)
        batch, heads, hd = x.shape[0], self.n_heads, self.head_dim
        if state is None:
            state = self.allocate_state(batch, device=x.device, dtype=self.q_proj.weight.dtype)
        q, k, v = self._qkv(x, key_padding_mask)
        # Shift SSM, continuing from the previous k values (the state's shift register).
        history = torch.cat([state.shift.to(k.dtype), k], dim=-1)
        next_shift = history[..., history.shape[-1] - (self.shift_len - 1):]
        k = long_conv(history, self.shift_kernel, self.shift_D)[..., self.shift_len - 1:]

        dta_re, dta_im, _, _ = self._discretised()
        a = torch.exp(torch.complex(dta_re, dta_im))  # (H, M)
        b = self._b_bar()
        c = torch.view_as_complex(self.C.contiguous())
        pairs = hd * hd
        x_ssm = state.ssm.reshape(batch, heads, pairs, -1)
        outputs = []
        for start in range(0, seqlen, chunk):
            length = min(chunk, seqlen - start)
            q_c, k_c, v_c = (t[..., start:start + length] for t in (q, k, v))
            kv = self._kv(k_c, v_c)
            carried = state_output(x_ssm, a, c, length)  # (B, H, pairs, length)
            y_c = self._heads(q_c, k_c, v_c, self.ssm_kernel(length), kv=kv, carried=carried)
            outputs.append(y_c)
            with torch.autocast(device_type=x.device.type, enabled=False):
                x_ssm = state_update(x_ssm, kv.to(self.q_proj.weight.dtype), a, b)
        y = torch.cat(outputs, dim=-1)
        next_state = H3State(next_shift, x_ssm.reshape(state.ssm.shape))
        return project_out(self.out_proj, y, x.dtype), next_state

    # ----------------------------------------------------------------------- recurrent form --
    def allocate_state(self, batch_size: int, *, device=None, dtype=None) -> H3State:
        """The zero state before the first token (dtype: the real dtype of the parameters)."""
        self._check_recurrent("allocate_state")
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
        self._check_recurrent("step")
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

    def _check_recurrent(self, method: str) -> None:
        if self.kernel_type != "ssm":
            raise ValueError(
                f"H3.{method}: the recurrent form needs kernel='ssm' (a finite diagonal state); "
                f"kernel={self.kernel_type!r} has none (generate by running the forward on the prefix)"
            )

    def _b_bar(self) -> Tensor:
        """``B_bar = (exp(dt A) - 1) / A * B`` as a complex ``(H, N/2)`` tensor (for ``step``)."""
        dt = torch.exp(self.log_dt).unsqueeze(-1)
        a = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        return (torch.exp(dt * a) - 1.0) / a * torch.view_as_complex(self.B.contiguous())

    def extra_repr(self) -> str:
        if self.kernel_type == "ssm":
            kernel = f"d_state={self.d_state}, ssm_init={self.ssm_init!r}"
        else:
            kernel = f"squash_lambda={self.squash_lambda}, smooth_radius={self.smooth_radius}, kernel_dropout={self.kernel_dropout}"
        return (
            f"d_model={self.d_model}, l_max={self.l_max}, head_dim={self.head_dim}, kernel={self.kernel_type!r}, "
            f"{kernel}, shift_len={self.shift_len}" + (f", state_chunk={self.state_chunk}" if self.state_chunk else "")
        )
