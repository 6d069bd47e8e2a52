"""``swap_attention``: replace the self-attention of an existing model with our mixers, in place.

One call, like Liger's ``apply_liger_kernel_to_*``::

    report = swap_attention(model, mixer="h3", head_dim=1)
    print(report)          # what was swapped where, what was kept and why

Supported:
  * ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``: ``self_attn`` becomes a
    :class:`MultiheadSelfMixer`, which takes ``nn.MultiheadAttention``'s call signature
    (``batch_first`` either way, ``attn_mask``, ``is_causal``, ``key_padding_mask``, ``need_weights``)
    and returns ``(out, None)``. These layers have no maximum length: ``l_max`` is needed only by
    mixers with a learned kernel (``longconv``, ``butterfly``, ``h3-longconv``), which say so.
  * Hugging Face ``transformers`` GPT-2 (``GPT2Attention`` self-attention): becomes a
    :class:`GPT2SelfMixer` (``l_max`` defaults to ``config.n_positions``).

Refused or kept, by decision:
  * Cross-attention (a decoder layer's ``multihead_attn``, GPT-2 ``crossattention``) is kept as
    attention and listed in the report: a convolution mixes one sequence, not two. A mixer called
    with ``key``/``value`` other than ``query`` raises.
  * Causality must match. A causal mixer (H3, LongConv, ButterflyLongConv with exact factors)
    serves only causal calls (``is_causal=True`` or a causal ``attn_mask``); a non-causal mixer
    (``bidirectional=True`` LongConv, learned ButterflyLongConv) serves only unmasked calls. It is
    checked twice: at swap time against the causality the layer is used with (``causal=``;
    default: an encoder layer is bidirectional, a decoder layer's self-attention and GPT-2 are
    causal), so ``swap_attention(encoder, "h3")`` fails at once unless ``causal=True`` says the
    encoder is called with a causal mask; and for torch layers on every call (how a layer is
    really called is only known then). Any other ``attn_mask`` raises. Under ``torch.compile`` an ``attn_mask`` tensor cannot be inspected, so
    there it is trusted to be the causal mask (eager calls check it).
  * Padding: ``key_padding_mask`` (torch) or the padding part of GPT-2's attention mask zeroes the
    padded positions' contribution inside the mixer.
  * Cached generation (GPT-2): a mixer with a recurrent ``step`` (H3 with its SSM kernel) keeps its
    O(1) state in the model's cache object, so ``generate`` and calls with a cache (``cache=``, or
    ``past_key_values=`` before transformers 5.24) feed one token at a time through ``step`` (the
    prompt too, token by token); the cache also gets
    one-float placeholder keys so that its length, hence the position ids, stays right. Refused
    with a clear error: padding in a cached call, and cache reordering (beam search). Mixers
    without ``step`` keep no cache: their models get ``config.use_cache = False`` and a call with
    a cache raises (generation recomputes the prefix).
  * ``nn.TransformerEncoder``'s nested-tensor fast path (which reads attention weights directly)
    is switched off for encoders whose layers were swapped.
  * An ``nn.MultiheadAttention`` outside the supported layers, or other attention classes, are
    kept and listed; if nothing can be swapped, ``swap_attention`` raises.

Saving and reloading a swapped GPT-2: ``save_pretrained`` writes the mixers' weights, and
``swap_attention`` records the swap in ``config.lcconv_swap`` (so it lands in config.json), but
``GPT2LMHeadModel.from_pretrained`` knows nothing of it and would rebuild plain attention with fresh
weights. Reload with :func:`load_swapped_pretrained` (builds the model from the config, re-applies
the recorded swap, then loads every saved tensor, strictly), or by hand: build the model, call
``swap_attention`` with the same arguments, then ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .mixers import MIXERS, make_mixer

__all__ = [
    "swap_attention", "load_swapped_pretrained", "SwapReport", "SwappedModule", "MultiheadSelfMixer", "GPT2SelfMixer",
    "SwapContext", "SwapHandler", "register_swap_handler", "swap_handlers",
]


@dataclass
class SwappedModule:
    path: str  # dotted path of the replaced module in the model
    original: str  # class of the attention that was there
    replacement: str  # class of the mixer now there
    causality: str  # "causal", "non-causal" or "checked per call (...)"


@dataclass
class SwapReport:
    """What ``swap_attention`` did: swapped modules, attention kept (with the reason), notes."""

    mixer: str
    swapped: list[SwappedModule] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swap_attention(mixer={self.mixer!r}): {len(self.swapped)} swapped, {len(self.kept)} kept"]
        lines += [f"  swapped {s.path}: {s.original} -> {s.replacement} [{s.causality}]" for s in self.swapped]
        lines += [f"  kept    {path}: {reason}" for path, reason in self.kept]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- torch layers --
def _is_causal_mask(mask: Tensor, seqlen: int) -> bool:
    """Whether ``mask`` (L, L), bool (True = blocked) or additive float (-inf = blocked), is causal."""
    if mask.shape != (seqlen, seqlen):
        return False
    future = torch.ones(seqlen, seqlen, dtype=torch.bool, device=mask.device).triu(1)
    blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    allowed_zero = True if mask.dtype == torch.bool else bool((mask[~future] == 0).all())
    return bool(torch.equal(blocked, future)) and allowed_zero


def _padding_from_additive(mask: Optional[Tensor]) -> Optional[Tensor]:
    """``(B, L)`` bool padding mask (True = pad) from a bool or additive float key mask."""
    if mask is None:
        return None
    return mask if mask.dtype == torch.bool else mask != 0


class MultiheadSelfMixer(nn.Module):
    """A mixer behind ``nn.MultiheadAttention``'s call signature (self-attention only)."""

    # Attributes nn.Transformer*Layer reads before deciding on its fused fast path; in_proj_bias
    # None makes it take the regular path, which calls this module.
    _qkv_same_embed_dim = True
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, mixer: nn.Module, *, embed_dim: int, num_heads: int, batch_first: bool):
        super().__init__()
        self.mixer = mixer
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if key is not query or value is not query:
            raise ValueError(
                "swap_attention: this layer's attention was replaced by a sequence mixer, which is "
                "self-attention only, but it was called with key/value different from query (cross-attention)"
            )
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, E)
        seqlen = x.shape[1]
        causal_call = bool(is_causal)
        if attn_mask is not None and not causal_call:
            # Eager: inspect the mask. Compiled: cannot read data; trusted to be causal (documented).
            if not torch.compiler.is_compiling() and not _is_causal_mask(attn_mask, seqlen):
                raise ValueError(
                    f"swap_attention: attn_mask of shape {tuple(attn_mask.shape)} is not the causal "
                    f"mask of length {seqlen}; a sequence mixer supports only causal or no masking"
                )
            causal_call = True
        mixer_causal = self.mixer.is_causal
        if causal_call != mixer_causal:
            want = "causal (is_causal=True or a causal attn_mask)" if mixer_causal else "unmasked (bidirectional)"
            got = "causally" if causal_call else "without a causal mask (bidirectional attention)"
            hint = (
                "swap with a non-causal mixer (mixer='longconv', bidirectional=True)"
                if not causal_call else "swap with a causal mixer (h3, longconv)"
            )
            raise ValueError(
                f"swap_attention: {type(self.mixer).__name__} is {'causal' if mixer_causal else 'not causal'} "
                f"and serves {want} calls, but the layer was called {got}; {hint}"
            )
        y = self.mixer(x, key_padding_mask=_padding_from_additive(key_padding_mask))
        return (y if self.batch_first else y.transpose(0, 1)), None


# ---------------------------------------------------------------------------------- GPT-2 --
def _padding_from_hf_mask(mask: Optional[Tensor], seqlen: int) -> Optional[Tensor]:
    """Padding (True = pad) from the mask GPT-2 passes its attention: None, 4D or 2D."""
    if mask is None:
        return None
    if mask.dim() == 4 and mask.shape[-2:] == (seqlen, seqlen):
        # The last query sees every non-padded key under a causal mask: its row is the padding.
        last_row = mask[:, 0, -1, :]
        if last_row.dtype == torch.bool:
            return ~last_row
        return last_row < torch.finfo(last_row.dtype).min / 2
    if mask.dim() == 2 and mask.shape[-1] == seqlen:
        return mask == 0
    raise ValueError(
        f"swap_attention: cannot read padding from an attention mask of shape {tuple(mask.shape)} "
        f"(dtype {mask.dtype}) for sequence length {seqlen}"
    )


class GPT2SelfMixer(nn.Module):
    """A causal mixer behind ``GPT2Attention``'s call signature; returns ``(out, None)``."""

    is_causal = True
    is_cross_attention = False

    def __init__(self, mixer: nn.Module, layer_idx: Optional[int] = None):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: Tensor,
        past_key_values=None,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        output_attentions: bool = False,
        cache=None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        # transformers 5.24 renamed the attention call's ``past_key_values`` to ``cache``.
        if past_key_values is None:
            past_key_values = cache
        if encoder_hidden_states is not None:
            raise ValueError("swap_attention: a swapped GPT-2 self-attention was called as cross-attention")
        if past_key_values is not None:
            if not _has_step(self.mixer):
                raise ValueError(
                    "swap_attention: the swapped mixer keeps no KV cache; call the model with use_cache=False "
                    "(generation then recomputes the prefix)"
                )
            return self._cached(hidden_states, past_key_values, attention_mask), None
        pad = _padding_from_hf_mask(attention_mask, hidden_states.shape[1])
        return self.mixer(hidden_states, key_padding_mask=pad), None

    def _cached(self, hidden_states: Tensor, cache, attention_mask: Optional[Tensor]) -> Tensor:
        """The new tokens through the mixer's ``step``, its state kept in ``cache`` (see module docstring)."""
        if attention_mask is not None and attention_mask.dim() == 4:
            # The last query row lists every key it may see: a blocked one is padding.
            visible = attention_mask[:, 0, -1, :]
            blocked = ~visible if visible.dtype == torch.bool else visible < torch.finfo(visible.dtype).min / 2
            if bool(blocked.any()):
                raise ValueError(
                    "swap_attention: cached generation with a swapped mixer does not support padding; "
                    "generate without padding, or with use_cache=False"
                )
        self_cache = getattr(cache, "self_attention_cache", cache)
        states = _mixer_states(self_cache)
        batch, new_tokens = hidden_states.shape[:2]
        state = states.get(self.layer_idx)
        if state is None:
            state = self.mixer.allocate_state(batch)
        elif state.__class__ is _Reordered:
            raise ValueError("swap_attention: the cache was reordered (beam search); mixer states cannot follow")
        outputs = []
        for t in range(new_tokens):
            y_t, state = self.mixer.step(hidden_states[:, t], state)
            outputs.append(y_t)
        states[self.layer_idx] = state
        # Placeholder keys/values (one float per token) keep the cache's length = tokens seen.
        placeholder = hidden_states.new_zeros(batch, 1, new_tokens, 1)
        self_cache.update(placeholder, placeholder, self.layer_idx)
        return torch.stack(outputs, dim=1)


class _Reordered:
    """Marks mixer states whose cache was reordered (beam search), which they cannot follow."""


def _mixer_states(cache) -> dict:
    """Per-layer mixer states stored on a Hugging Face cache object (created on first use)."""
    states = getattr(cache, "lcconv_mixer_states", None)
    if states is None:
        states = {}
        cache.lcconv_mixer_states = states
        reorder = getattr(cache, "reorder_cache", None)
        if reorder is not None:
            def reorder_cache(beam_idx, _reorder=reorder):
                for layer in states:
                    states[layer] = _Reordered()
                return _reorder(beam_idx)

            cache.reorder_cache = reorder_cache
    return states


def _has_step(mixer: nn.Module) -> bool:
    """Whether the mixer runs as a recurrence (H3 with its SSM kernel has step; H3-LongConv does not)."""
    return callable(getattr(mixer, "step", None)) and getattr(mixer, "kernel_type", "ssm") == "ssm"


def _gpt2_attention_class() -> tuple[Optional[type], int]:
    """``(GPT2Attention, transformers major version)``, or ``(None, 0)`` without transformers."""
    try:
        import transformers
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    except ImportError:
        return None, 0
    return GPT2Attention, int(transformers.__version__.split(".")[0])


def _gpt2_l_max(config) -> Optional[int]:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# ------------------------------------------------------------------------------- the call --
def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    param = next(reference.parameters(), None)
    return module if param is None else module.to(device=param.device, dtype=param.dtype)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def _check_causality(where: str, layer_causal: bool, stated: bool, mixer: str, new: nn.Module, options: dict) -> None:
    """Refuse at swap time a mixer whose causality differs from the layer's use (see module docstring)."""
    if new.is_causal == layer_causal:
        return
    how = "stated with causal=" + str(layer_causal) if stated else (
        "causal (self-attention over generated tokens)" if layer_causal else "bidirectional (no causal mask) by default"
    )
    if layer_causal:
        fix = "use a causal configuration (learn_butterfly=False, bidirectional=False)"
    else:
        fix = ("pass causal=True if the model calls it with is_causal=True or a causal mask, or swap in a "
               "non-causal mixer (mixer='longconv', bidirectional=True)")
    raise ValueError(
        f"swap_attention: {where} is {how}, but mixer {mixer!r} with options {options} is "
        f"{'causal' if new.is_causal else 'not causal'}; {fix}"
    )


@dataclass
class SwapContext:
    """What a handler reads (the call's arguments) and fills (plans, report, handled modules)."""

    mixer: str
    l_max: Optional[int]
    causal: Optional[bool]
    mixer_options: dict
    report: SwapReport
    plans: list = field(default_factory=list)  # (path, original, replacement, handler name)
    handled: set = field(default_factory=set)  # ids of attention modules a handler has decided on

    def plan(self, handler: str, path: str, original: nn.Module, replacement: nn.Module) -> None:
        self.plans.append((path, original, replacement, handler))

    def planned(self, handler: str) -> list[tuple[nn.Module, nn.Module]]:
        """(original, replacement) of every swap this handler planned."""
        return [(original, new) for _, original, new, name in self.plans if name == handler]


@dataclass(frozen=True)
class SwapHandler:
    """One model family ``swap_attention`` knows, in one place (as Liger's ``apply_liger_kernel_to_*``).

    ``matches(module)``: whether a module of the model belongs to this family; ``plan(ctx, path,
    module)`` decides it: plans replacements (``ctx.plan``), adds report entries, marks the
    attention modules it decided on (``ctx.handled``); ``finish(model, ctx)`` runs once after
    every swap of the model is applied, if this handler planned any (config changes, notes).
    A new family is one handler passed to :func:`register_swap_handler`."""

    name: str
    matches: Callable[[nn.Module], bool]
    plan: Callable[[SwapContext, str, nn.Module], None]
    finish: Optional[Callable[[nn.Module, SwapContext], None]] = None


_HANDLERS: list[SwapHandler] = []


def register_swap_handler(handler: SwapHandler) -> SwapHandler:
    """Add a model family to ``swap_attention`` (tried in registration order; a handler of the same
    name is replaced). Returns the handler."""
    _HANDLERS[:] = [h for h in _HANDLERS if h.name != handler.name]
    _HANDLERS.append(handler)
    return handler


def swap_handlers() -> tuple[SwapHandler, ...]:
    """The registered handlers, in the order they are tried."""
    return tuple(_HANDLERS)


# ------------------------------------------------------------------ torch transformer layers --
def _torch_layer_plan(ctx: SwapContext, path: str, module: nn.Module) -> None:
    prefix = f"{path}." if path else ""
    attn = module.self_attn
    if not attn._qkv_same_embed_dim:
        raise ValueError(f"swap_attention: {prefix}self_attn has kdim/vdim != embed_dim; not a self-attention")
    try:
        new = _like(make_mixer(ctx.mixer, attn.embed_dim, ctx.l_max, **ctx.mixer_options), attn)
    except ValueError as err:
        if ctx.l_max is not None or "l_max" not in str(err):
            raise
        raise ValueError(
            f"swap_attention: mixer {ctx.mixer!r} needs l_max for {type(module).__name__} at "
            f"{path or '<model>'} (torch transformer layers have no maximum length): {err}"
        ) from err
    layer_causal = ctx.causal if ctx.causal is not None else isinstance(module, nn.TransformerDecoderLayer)
    _check_causality(f"{type(module).__name__} at {path or '<model>'}", layer_causal, ctx.causal is not None,
                     ctx.mixer, new, ctx.mixer_options)
    wrapped = MultiheadSelfMixer(new, embed_dim=attn.embed_dim, num_heads=attn.num_heads, batch_first=attn.batch_first)
    ctx.plan("torch", prefix + "self_attn", attn, wrapped)
    ctx.report.swapped.append(
        SwappedModule(prefix + "self_attn", type(attn).__name__, type(new).__name__,
                      f"checked per call ({'causal' if new.is_causal else 'non-causal'} mixer)")
    )
    ctx.handled.add(id(attn))
    if isinstance(module, nn.TransformerDecoderLayer):
        ctx.report.kept.append((prefix + "multihead_attn", "cross-attention (queries and keys from different sequences)"))
        ctx.handled.add(id(module.multihead_attn))


def _torch_layer_finish(model: nn.Module, ctx: SwapContext) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            module.use_nested_tensor = False
            ctx.report.notes.append(f"{path or '<model>'}: nested-tensor fast path switched off")


# ------------------------------------------------------------------------------------ GPT-2 --
def _is_gpt2_attention(module: nn.Module) -> bool:
    gpt2_attention, _ = _gpt2_attention_class()
    return gpt2_attention is not None and isinstance(module, gpt2_attention)


def _gpt2_plan(ctx: SwapContext, path: str, module: nn.Module) -> None:
    ctx.handled.add(id(module))
    _, transformers_major = _gpt2_attention_class()
    if transformers_major < 5:
        raise ValueError(
            f"swap_attention: GPT-2 at {path} comes from transformers {transformers_major}.x; "
            "the replacement follows the transformers >= 5 attention call (past_key_values, (out, weights))"
        )
    if module.is_cross_attention:
        ctx.report.kept.append((path, "cross-attention (queries and keys from different sequences)"))
        return
    layer_l_max = ctx.l_max if ctx.l_max is not None else _gpt2_l_max(module.config)
    new = _like(make_mixer(ctx.mixer, module.embed_dim, layer_l_max, **ctx.mixer_options), module)
    if ctx.causal is False:
        raise ValueError(f"swap_attention: GPT-2 attention at {path} is causal; causal=False does not apply")
    _check_causality(f"GPT-2 attention at {path}", True, False, ctx.mixer, new, ctx.mixer_options)
    ctx.plan("gpt2", path, module, GPT2SelfMixer(new, getattr(module, "layer_idx", None)))
    ctx.report.swapped.append(SwappedModule(path, type(module).__name__, type(new).__name__, "causal"))


def _gpt2_finish(model: nn.Module, ctx: SwapContext) -> None:
    report = ctx.report
    gpt2_swaps = ctx.planned("gpt2")
    gpt2_configs = {id(orig.config): orig.config for orig, _ in gpt2_swaps}
    recurrent = all(_has_step(new.mixer) for _, new in gpt2_swaps)
    if recurrent:
        report.notes.append(f"cached generation runs {type(gpt2_swaps[0][1].mixer).__name__}.step, one token at a time")
    for config in gpt2_configs.values():
        if getattr(config, "use_cache", False) and not recurrent:
            config.use_cache = False
            report.notes.append("GPT-2 config.use_cache set to False (the mixers keep no KV cache)")
    for config in gpt2_configs.values():
        # Saved with the config by save_pretrained: load_swapped_pretrained re-applies it.
        config.lcconv_swap = {"mixer": ctx.mixer, "l_max": ctx.l_max, "causal": ctx.causal,
                              "options": dict(ctx.mixer_options)}
    report.notes.append("config.lcconv_swap records the swap: reload with load_swapped_pretrained")
    generation_config = getattr(model, "generation_config", None)
    if not recurrent and generation_config is not None and getattr(generation_config, "use_cache", False):
        generation_config.use_cache = False
        report.notes.append("generation_config.use_cache set to False")


register_swap_handler(SwapHandler(
    "torch", lambda module: isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)),
    _torch_layer_plan, _torch_layer_finish))
register_swap_handler(SwapHandler("gpt2", _is_gpt2_attention, _gpt2_plan, _gpt2_finish))


# ------------------------------------------------------------------------------- the call --
def swap_attention(
    model: nn.Module,
    mixer: str = "h3",
    *,
    l_max: Optional[int] = None,
    causal: Optional[bool] = None,
    **mixer_options,
) -> SwapReport:
    """Replace the self-attention layers of ``model`` in place by ``mixer`` layers; return a report.

    Args:
        model: a model containing ``nn.TransformerEncoderLayer``/``TransformerDecoderLayer`` or
            Hugging Face GPT-2 blocks (or one such layer itself), or modules of a family added
            with :func:`register_swap_handler`.
        mixer: ``"h3"``, ``"h3-longconv"``, ``"longconv"`` or ``"butterfly"``.
        l_max: longest sequence the new mixers accept; needed by the learned-kernel mixers for
            torch layers (GPT-2 defaults to ``config.n_positions``); H3 needs none.
        causal: whether the model calls its self-attention causally. Default: False for
            ``TransformerEncoderLayer``, True for ``TransformerDecoderLayer`` and GPT-2. A mixer
            of the other causality is refused here, at swap time (e.g. pass ``causal=True`` to put
            H3 into an encoder that is called with ``is_causal=True``).
        **mixer_options: passed to every mixer (e.g. ``head_dim=2`` for H3, ``bidirectional=True``).

    Raises ValueError naming the problem when the mixer is unknown, ``l_max`` is missing for a
    mixer that needs it, the mixer's causality differs from the layer's (``causal``), or nothing
    in the model can be swapped.
    See the module docstring for what is kept and what is checked per call.
    """
    choices = [name for name in MIXERS if name != "attention"]
    if mixer not in choices:
        raise ValueError(f"swap_attention: unknown mixer {mixer!r}; choose one of {', '.join(map(repr, choices))}")
    ctx = SwapContext(mixer, l_max, causal, mixer_options, SwapReport(mixer))
    report = ctx.report
    handlers = swap_handlers()
    for path, module in list(model.named_modules()):
        if id(module) in ctx.handled:
            continue
        handler = next((h for h in handlers if h.matches(module)), None)
        if handler is not None:
            handler.plan(ctx, path, module)

    for path, module in model.named_modules():
        if id(module) in ctx.handled or isinstance(module, (MultiheadSelfMixer, GPT2SelfMixer)):
            continue
        if isinstance(module, nn.MultiheadAttention):
            report.kept.append((path or "<model>", "nn.MultiheadAttention outside TransformerEncoderLayer/DecoderLayer: "
                                "cannot tell self- from cross-attention; swap the enclosing layer"))
        elif type(module).__name__.endswith("Attention") and not isinstance(module, tuple(MIXERS.values())):
            report.kept.append((path or "<model>", f"unsupported attention class {type(module).__name__}"))

    if not ctx.plans:
        kept = "; ".join(f"{p}: {r}" for p, r in report.kept) or "no attention modules"
        raise ValueError(f"swap_attention: nothing to swap in {type(model).__name__} ({kept})")

    for path, _, new, _ in ctx.plans:
        if path == "":
            raise ValueError("swap_attention: pass the model or layer that contains the attention, not the attention")
        _replace(model, path, new)
    for handler in handlers:
        if handler.finish is not None and ctx.planned(handler.name):
            handler.finish(model, ctx)
    return report


# ------------------------------------------------------------------------------- reloading --
def _saved_state_dict(path: str) -> dict:
    """Every tensor ``save_pretrained`` wrote to the directory ``path`` (safetensors, sharded or not, or .bin)."""
    import json
    import os

    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single) or os.path.exists(index):
        from safetensors.torch import load_file

        files = [single] if os.path.exists(single) else sorted(
            {os.path.join(path, name) for name in json.load(open(index))["weight_map"].values()}
        )
        state = {}
        for file in files:
            state.update(load_file(file))
        return state
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"load_swapped_pretrained: no model.safetensors(.index.json) or pytorch_model.bin in {path}")


def load_swapped_pretrained(model_class: type, path: str) -> nn.Module:
    """Reload a model saved with ``save_pretrained`` after :func:`swap_attention`.

    ``model_class`` is the Hugging Face class it was saved from (e.g. ``GPT2LMHeadModel``), ``path``
    the directory. Builds the model from its config, re-applies the swap recorded in
    ``config.lcconv_swap``, loads every saved tensor (missing keys only for tied weights,
    e.g. the LM head; anything else raises) and returns it in eval mode, as ``from_pretrained`` does.
    """
    config = model_class.config_class.from_pretrained(path)
    swap = getattr(config, "lcconv_swap", None)
    if not isinstance(swap, dict) or "mixer" not in swap:
        raise ValueError(
            f"load_swapped_pretrained: the config in {path} has no `lcconv_swap` entry, so it was not "
            f"saved from a model swapped by swap_attention; load it with {model_class.__name__}.from_pretrained"
        )
    model = model_class(config)
    swap_attention(model, swap["mixer"], l_max=swap.get("l_max"), causal=swap.get("causal"), **swap.get("options", {}))
    state = _saved_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops one name of each tied pair: accept a missing key only if its tensor was loaded.
    loaded = {id(t) for name, t in model.state_dict(keep_vars=True).items() if name in state}
    untied = [name for name in missing if id(model.state_dict(keep_vars=True)[name]) not in loaded]
    if untied or unexpected:
        raise ValueError(
            f"load_swapped_pretrained: {path} does not match the swapped {model_class.__name__} "
            f"(missing: {untied}, unexpected: {list(unexpected)}); was it saved with other swap options?"
        )
    return model.eval()
