"""Synthetic in-context-learning tasks from the H3 paper: associative recall and induction heads.

Both generators are vectorised (a whole batch in a few tensor ops, on any device) and return a
:class:`SyntheticBatch` of next-token ``inputs``/``targets`` (``(B, seq_len)`` each, targets are
inputs shifted by one), a ``loss_mask`` of the positions worth training on, and the answer at the
last position. Token ids: 0 = noop (left filler), 1 = the separator/copy prefix, 2.. = ordinary.

Associative recall (as in H3/safari): keys are the first half of the ordinary tokens, values the
second half; each sequence draws its own key -> value map and shows random ``key value`` pairs,
then ``SEP key`` for a key that appeared; the target is its value. Every value position is
predictable once its key has been seen, so all value positions are in the loss mask.

Induction head: random ordinary tokens with ``SEP x`` planted once at a random place; the
sequence ends with ``SEP`` and the target is ``x``. Only the last position is predictable.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["SyntheticBatch", "associative_recall", "induction_head", "TASKS", "NOOP", "SEP"]

NOOP, SEP = 0, 1
_SPECIAL = 2


class SyntheticBatch(NamedTuple):
    inputs: Tensor  # (B, L) int64
    targets: Tensor  # (B, L) int64, inputs shifted by one
    loss_mask: Tensor  # (B, L) bool, positions to train on (always includes the last)

    @property
    def answers(self) -> Tensor:
        """The answer token of each sequence (target at the last position), ``(B,)``."""
        return self.targets[:, -1]


def _check(task: str, seq_len: int, vocab_size: int, min_len: int, min_vocab: int) -> None:
    if seq_len < min_len:
        raise ValueError(f"{task}: seq_len must be >= {min_len}, got {seq_len}")
    if vocab_size < min_vocab:
        raise ValueError(f"{task}: vocab_size must be >= {min_vocab} (2 special tokens + ordinary ones), got {vocab_size}")


def _split(tokens: Tensor, loss_mask: Tensor) -> SyntheticBatch:
    return SyntheticBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), loss_mask[:, 1:].contiguous())


def associative_recall(
    batch_size: int,
    seq_len: int,
    vocab_size: int = 20,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> SyntheticBatch:
    """Associative-recall batch; ``vocab_size`` counts the 2 special tokens (keys/values split the rest)."""
    _check("associative_recall", seq_len, vocab_size, 4, _SPECIAL + 2)
    ordinary = vocab_size - _SPECIAL
    n_keys, n_values = ordinary // 2, ordinary - ordinary // 2
    n_pairs = (seq_len - 2) // 2
    filler = seq_len + 1 - (2 * n_pairs + 3)  # 0 or 1 noop at the front
    opts = {"generator": generator, "device": device}

    kv_map = torch.randint(n_values, (batch_size, n_keys), **opts)
    keys = torch.randint(n_keys, (batch_size, n_pairs), **opts)
    values = kv_map.gather(1, keys)
    query = keys.gather(1, torch.randint(n_pairs, (batch_size, 1), **opts))  # a key that appeared
    answer = kv_map.gather(1, query)

    key_tokens, value_tokens = keys + _SPECIAL, values + _SPECIAL + n_keys
    pairs = torch.stack([key_tokens, value_tokens], dim=-1).view(batch_size, 2 * n_pairs)
    tokens = torch.cat(
        [
            torch.full((batch_size, filler), NOOP, dtype=torch.long, device=pairs.device),
            pairs,
            torch.full((batch_size, 1), SEP, dtype=torch.long, device=pairs.device),
            query + _SPECIAL,
            answer + _SPECIAL + n_keys,
        ],
        dim=1,
    )
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, filler + 1 : filler + 2 * n_pairs : 2] = True  # value positions
    loss_mask[:, -1] = True
    return _split(tokens, loss_mask)


def induction_head(
    batch_size: int,
    seq_len: int,
    vocab_size: int = 20,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> SyntheticBatch:
    """Induction-head batch: ``... SEP x ... SEP`` -> ``x``."""
    _check("induction_head", seq_len, vocab_size, 3, _SPECIAL + 1)
    body_len = seq_len - 1  # body, then SEP, then the answer: seq_len + 1 tokens
    opts = {"generator": generator, "device": device}
    body = torch.randint(vocab_size - _SPECIAL, (batch_size, body_len), **opts) + _SPECIAL
    trigger = torch.randint(body_len - 1, (batch_size, 1), **opts)  # SEP at trigger, x after it
    body.scatter_(1, trigger, SEP)
    answer = body.gather(1, trigger + 1)
    tokens = torch.cat([body, torch.full_like(answer, SEP), answer], dim=1)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, -1] = True
    return _split(tokens, loss_mask)


TASKS = {"recall": associative_recall, "induction": induction_head}
