"""``LongConvLM``: a small causal language model whose sequence mixer is selectable by name.

Embedding -> N pre-norm residual blocks (``x + mixer(norm(x))``, ``x + mlp(norm(x))``) -> final
norm -> head tied to the embedding. Mixers: ``"h3"``, ``"h3-longconv"``, ``"longconv"``,
``"butterfly"``, ``"attention"`` (see :mod:`lcconv_compile.models.mixers`). Used by the synthetic-task script and
the model benchmarks; it holds no training logic.

``causal=True`` (the default) refuses a mixer that is not causal (a bidirectional LongConv, or a
ButterflyLongConv with learned factors), because next-token training would then read the answer
from the future; pass ``causal=False`` only when the loss is on positions with nothing after them.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ._common import check_positive
from .attention import Attention
from .mixers import make_mixer

__all__ = ["LongConvLM", "Block"]


class Block(nn.Module):
    """Pre-norm residual block: mixer, then a GELU MLP."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm_mixer = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.dropout(self.mixer(self.norm_mixer(x), key_padding_mask=key_padding_mask))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class LongConvLM(nn.Module):
    """Token ids ``(B, L)`` -> logits ``(B, L, vocab_size)``.

    Args:
        vocab_size, d_model, n_layers: sizes.
        l_max: longest sequence (the learned-kernel mixers' kernel length); None for mixers without
            a maximum length (``"h3"``, ``"attention"``).
        mixer: ``"h3"``, ``"h3-longconv"``, ``"longconv"``, ``"butterfly"`` or ``"attention"``.
        mixer_options: keyword options for every mixer layer (e.g. ``{"head_dim": 2}`` for H3).
        mlp_ratio: MLP hidden size / d_model.
        dropout: residual dropout.
        causal: require causal mixers (see the module docstring).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 128,
        n_layers: int = 2,
        l_max: Optional[int] = 1024,
        mixer: str = "h3",
        mixer_options: Optional[dict] = None,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        causal: bool = True,
    ):
        super().__init__()
        check_positive("LongConvLM", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers)
        if l_max is not None:
            check_positive("LongConvLM", l_max=l_max)
        self.vocab_size, self.d_model, self.l_max, self.mixer_name = vocab_size, d_model, l_max, mixer
        self.embedding = nn.Embedding(vocab_size, d_model)
        mixer_options = dict(mixer_options or {})
        if causal and mixer == "butterfly":
            # Learned factors make the layer non-causal (butterfly.py); a causal LM keeps them exact.
            mixer_options.setdefault("learn_butterfly", False)
        self.blocks = nn.ModuleList(
            Block(d_model, make_mixer(mixer, d_model, l_max, **mixer_options), mlp_ratio, dropout)
            for _ in range(n_layers)
        )
        if causal and not self.blocks[0].mixer.is_causal:
            raise ValueError(
                f"LongConvLM: mixer {mixer!r} with options {mixer_options} is not causal; "
                "use a causal configuration (e.g. learn_butterfly=False, bidirectional=False) "
                "or pass causal=False if the loss only reads positions with nothing after them"
            )
        self.causal = causal
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # tied
        nn.init.normal_(self.embedding.weight, std=0.02)

    def allocate_state(self, batch_size: int, max_len: Optional[int] = None) -> list:
        """Per-layer decoding states for :meth:`step` (``max_len``: the attention KV cache's size)."""
        states = []
        for block in self.blocks:
            mixer = block.mixer
            if not hasattr(mixer, "step"):
                raise ValueError(f"LongConvLM.allocate_state: mixer {self.mixer_name!r} has no recurrent step")
            if isinstance(mixer, Attention):
                if max_len is None:
                    raise ValueError("LongConvLM.allocate_state: attention's KV cache needs max_len")
                states.append(mixer.allocate_state(batch_size, max_len))
            else:
                states.append(mixer.allocate_state(batch_size))
        return states

    def step(self, token_ids: Tensor, states: list) -> tuple[Tensor, list]:
        """One token per sequence: ``token_ids`` ``(B,)`` -> ``(logits (B, vocab), next states)``."""
        x = self.embedding(token_ids)
        next_states = []
        for block, state in zip(self.blocks, states):
            y, state = block.mixer.step(block.norm_mixer(x), state)
            x = x + y
            x = x + block.mlp(block.norm_mlp(x))
            next_states.append(state)
        return self.head(self.norm(x)), next_states

    def forward(self, input_ids: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"LongConvLM: expected token ids of shape (B, L), got {tuple(input_ids.shape)}")
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.head(self.norm(x))
