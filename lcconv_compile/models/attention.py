"""``Attention``: multi-head softmax attention through ``F.scaled_dot_product_attention``.

The baseline the long-convolution mixers are compared with in the LM and the synthetic tasks;
same conventions as the other mixers (``(B, L, d_model)`` in and out). Rotary position
embeddings on q and k give it the relative positions a convolution has by construction (without
them causal attention cannot tell "the token after the key" on associative recall).
It is not a long convolution and does not call ``lcconv_compile.fftconv``.

``step`` (with ``allocate_state``) runs the causal layer one token at a time over a KV cache, as
in generation: the baseline for ``H3.step`` (O(1) per token) in the model benchmark. A simple
cache: preallocated ``(B, heads, max_len, head_dim)`` keys and values and the number filled.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_divisible, check_seqlen

__all__ = ["Attention", "KVCache", "apply_rotary"]


class KVCache(NamedTuple):
    """Keys and values of the tokens so far: ``(B, heads, max_len, head_dim)`` each, ``length`` filled."""

    keys: Tensor
    values: Tensor
    length: int


def apply_rotary(x: Tensor, base: float = 10000.0, offset: int = 0) -> Tensor:
    """Rotary position embedding on ``x (B, heads, L, head_dim)`` (head_dim even), rotate-half form.

    ``offset``: the position of ``x``'s first row (a decoding step at position ``offset``).
    """
    seqlen, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    positions = torch.arange(offset, offset + seqlen, device=x.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Softmax attention mixer.

    Args:
        d_model: channels; divisible by ``n_heads``.
        l_max: optional longest sequence (checked when given; attention itself has no limit).
        n_heads: heads (default: head_dim 64, or one head when d_model < 64).
        causal: causal mask (True) or bidirectional.
        rotary: rotary position embeddings on q and k (head_dim must be even).
        dropout: attention-weight dropout in training.
    """

    def __init__(
        self,
        d_model: int,
        l_max: Optional[int] = None,
        *,
        n_heads: Optional[int] = None,
        causal: bool = True,
        rotary: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        n_heads = n_heads if n_heads is not None else max(1, d_model // 64)
        check_divisible("Attention", d_model, "n_heads", n_heads)
        head_dim = d_model // n_heads
        if rotary and head_dim % 2:
            raise ValueError(f"Attention: rotary embeddings need an even head_dim, got d_model/n_heads = {head_dim}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.l_max, self.n_heads, self.head_dim = d_model, l_max, n_heads, head_dim
        self.causal, self.rotary, self.dropout = causal, rotary, dropout
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, **factory)
        self.out_proj = nn.Linear(d_model, d_model, **factory)

    @property
    def is_causal(self) -> bool:
        return self.causal

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x``: ``(B, L, d_model)``; ``key_padding_mask``: optional ``(B, L)`` bool, True = padding."""
        seqlen = check_seqlen("Attention", x, self.d_model, self.l_max)
        batch = x.shape[0]
        q, k, v = self.qkv_proj(x).view(batch, seqlen, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = apply_rotary(q), apply_rotary(k)
        mask, is_causal = None, self.causal
        if key_padding_mask is not None:
            allowed = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
            if self.causal:
                allowed = allowed & torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()
            # Every query may see itself, so a fully padded row cannot turn into NaN.
            mask = allowed | torch.eye(seqlen, dtype=torch.bool, device=x.device)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.out_proj(y.transpose(1, 2).reshape(batch, seqlen, self.d_model))

    def allocate_state(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        """An empty cache for up to ``max_len`` tokens (dtype: the parameters')."""
        if not self.causal:
            raise ValueError("Attention.allocate_state: token-by-token decoding needs causal=True")
        weight = self.qkv_proj.weight
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        keys = torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype)
        return KVCache(keys, torch.zeros_like(keys), 0)

    def step(self, x_t: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        """One token: ``x_t`` ``(B, d_model)`` -> ``(y_t, cache with this token's key and value)``.

        Writes into the cache's tensors in place (the returned cache shares them).
        """
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"Attention.step: expected x_t of shape (B, d_model={self.d_model}), got {tuple(x_t.shape)}")
        position = state.length
        if position >= state.keys.shape[2]:
            raise ValueError(f"Attention.step: the cache holds {state.keys.shape[2]} tokens and is full")
        batch = x_t.shape[0]
        q, k, v = self.qkv_proj(x_t).view(batch, 3, self.n_heads, 1, self.head_dim).unbind(1)
        if self.rotary:
            q, k = apply_rotary(q, offset=position), apply_rotary(k, offset=position)
        state.keys[:, :, position : position + 1] = k.to(state.keys.dtype)
        state.values[:, :, position : position + 1] = v.to(state.values.dtype)
        keys, values = state.keys[:, :, : position + 1], state.values[:, :, : position + 1]
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype))  # all cached are past
        return self.out_proj(y.reshape(batch, self.d_model)), KVCache(state.keys, state.values, position + 1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, rotary={self.rotary}"
