"""models/swap.py: swap_attention on torch transformer layers and Hugging Face GPT-2."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcconv_compile.models import SwapReport, load_swapped_pretrained, swap_attention
from lcconv_compile.models.swap import GPT2SelfMixer, MultiheadSelfMixer


def encoder(batch_first, d_model=16, layers=2):
    layer = nn.TransformerEncoderLayer(d_model, 2, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, layers)


def causal_mask(n):
    return nn.Transformer.generate_square_subsequent_mask(n)


# ---------------------------------------------------------------------------- torch layers --
@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_swap_keeps_shapes_and_is_causal(batch_first):
    model = encoder(batch_first).double()
    report = swap_attention(model, "h3", l_max=32, causal=True)
    assert isinstance(report, SwapReport)
    assert [s.path for s in report.swapped] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(s.original == "MultiheadAttention" and s.replacement == "H3" for s in report.swapped)
    assert isinstance(model.layers[0].self_attn, MultiheadSelfMixer)
    assert model.layers[0].self_attn.mixer.q_proj.weight.dtype == torch.float64
    shape = (3, 20, 16) if batch_first else (20, 3, 16)
    x = torch.randn(*shape, dtype=torch.float64)
    y = model(x, mask=causal_mask(20).double(), is_causal=True)
    assert y.shape == x.shape
    # Causal: redraw the inputs after position 9.
    x2 = x.clone()
    later = (slice(None), slice(10, None)) if batch_first else (slice(10, None),)
    x2[later] = torch.randn_like(x2[later])
    y2 = model(x2, mask=causal_mask(20).double(), is_causal=True)
    early = (slice(None), slice(None, 10)) if batch_first else (slice(None, 10),)
    assert (y2 - y)[early].abs().max() < 1e-12 and (y2 - y)[later].abs().max() > 1e-6
    # A layer called directly with the causal mask only (no is_causal hint) is accepted too.
    assert model.layers[0](x, src_mask=causal_mask(20).double()).shape == x.shape


def test_encoder_key_padding_mask():
    model = encoder(True).double()
    swap_attention(model, "longconv", l_max=16, causal=True)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, 8:] = True
    pad[1, :2] = True
    x2 = x.clone()
    x2[pad] = torch.randn_like(x2[pad])
    mask = causal_mask(12).double()
    y = model(x, mask=mask, src_key_padding_mask=pad)
    y2 = model(x2, mask=mask, src_key_padding_mask=pad)
    torch.testing.assert_close(y[~pad], y2[~pad])
    model.eval()  # eval + no_grad + padding would take the nested-tensor fast path: switched off
    with torch.no_grad():
        assert model(x, mask=mask, src_key_padding_mask=pad).shape == x.shape


def test_causality_must_match():
    # At swap time: an encoder is bidirectional unless the caller says it is called causally.
    with pytest.raises(ValueError, match="TransformerEncoderLayer at layers.0 is bidirectional .* by default, but "
                       "mixer 'h3' with options \\{\\} is causal; pass causal=True if the model calls it with is_causal=True"):
        swap_attention(encoder(True), "h3")
    with pytest.raises(ValueError, match="TransformerEncoderLayer at layers.0 is stated with causal=True, but mixer "
                       "'longconv' .* is not causal"):
        swap_attention(encoder(True), "longconv", l_max=16, bidirectional=True, causal=True)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), 1)
    with pytest.raises(ValueError, match="TransformerDecoderLayer at layers.0 is causal .* is not causal"):
        swap_attention(decoder, "longconv", l_max=16, bidirectional=True)
    with pytest.raises(ValueError, match="causal=False does not apply"):
        swap_attention(tiny_gpt2(), "h3", causal=False)
    # On every call: the layer must then really be called the stated way.
    model = encoder(True)
    swap_attention(model, "h3", l_max=16, causal=True)
    x = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="H3 is causal .* called without a causal mask .* bidirectional=True"):
        model(x)
    bad_mask = torch.zeros(10, 10)
    bad_mask[0, 5] = float("-inf")
    with pytest.raises(ValueError, match="attn_mask of shape \\(10, 10\\) is not the causal mask of length 10"):
        model.layers[0](x, src_mask=bad_mask)
    bidirectional = encoder(True)
    report = swap_attention(bidirectional, "longconv", l_max=16, bidirectional=True)
    assert "non-causal mixer" in report.swapped[0].causality
    assert bidirectional(x).shape == x.shape
    with pytest.raises(ValueError, match="LongConv is not causal .* called causally"):
        bidirectional(x, mask=causal_mask(10), is_causal=True)


def test_decoder_keeps_cross_attention():
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, 2)
    report = swap_attention(model, "h3", l_max=16, head_dim=2)
    assert [s.path for s in report.swapped] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert [p for p, _ in report.kept] == ["layers.0.multihead_attn", "layers.1.multihead_attn"]
    assert all("cross-attention" in reason for _, reason in report.kept)
    assert isinstance(model.layers[0].multihead_attn, nn.MultiheadAttention)
    assert "kept    layers.0.multihead_attn: cross-attention" in str(report)
    tgt, memory = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    assert model(tgt, memory, tgt_mask=causal_mask(9), tgt_is_causal=True).shape == tgt.shape
    with pytest.raises(ValueError, match="cross-attention"):
        model.layers[0].self_attn(tgt, memory, memory)


@pytest.mark.parametrize("mixer,l_max", [("h3", None), ("h3-longconv", 16)])
def test_h3_swaps_without_l_max_and_h3_longconv_with_it(mixer, l_max):
    model = encoder(True)
    report = swap_attention(model, mixer, l_max=l_max, causal=True)
    swapped = model.layers[0].self_attn.mixer
    assert swapped.l_max == l_max and swapped.kernel_type == ("ssm" if mixer == "h3" else "longconv")
    assert "H3" in str(report)
    x = torch.randn(2, 16, 16)
    assert model(x, mask=causal_mask(16), is_causal=True).shape == x.shape


def test_refusals():
    with pytest.raises(ValueError, match="unknown mixer 'attention'; choose one of 'h3', 'h3-longconv', 'longconv', 'butterfly'"):
        swap_attention(encoder(True), "attention", l_max=8)
    with pytest.raises(ValueError, match="mixer 'longconv' needs l_max for TransformerEncoderLayer at layers.0.*"
                       "LongConv: l_max is required"):
        swap_attention(encoder(True), "longconv", causal=True)
    with pytest.raises(ValueError, match="nothing to swap in Sequential .*outside TransformerEncoderLayer"):
        swap_attention(nn.Sequential(nn.MultiheadAttention(8, 2)), "h3", l_max=8)
    with pytest.raises(ValueError, match="nothing to swap in Linear \\(no attention modules\\)"):
        swap_attention(nn.Linear(4, 4), "h3", l_max=8)
    with pytest.raises(ValueError, match="d_model = 16 is not divisible by head_dim = 3"):
        swap_attention(encoder(True), "h3", l_max=8, head_dim=3, causal=True)


class TinyCausalEncoderLM(nn.Module):
    def __init__(self, vocab=20, d_model=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.encoder = encoder(True, d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids):
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.head(self.encoder(self.embed(ids), mask=mask, is_causal=True))


def test_swapped_encoder_compiles_and_trains():
    model = TinyCausalEncoderLM()
    swap_attention(model, "longconv", l_max=24, causal=True)
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 20, (8, 17))
    losses = []
    for _ in range(6):
        logits = compiled(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    torch.testing.assert_close(compiled(ids[:, :-1]), model(ids[:, :-1]), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- GPT-2 --
transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                    eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GPT2Config(**{**settings, **overrides})
    return GPT2LMHeadModel(config)


def test_gpt2_swap_report_shapes_and_causality():
    model = tiny_gpt2().double()
    report = swap_attention(model, "h3")
    assert [s.path for s in report.swapped] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(s.original == "GPT2Attention" and s.causality == "causal" for s in report.swapped)
    assert isinstance(model.transformer.h[0].attn, GPT2SelfMixer)
    assert model.transformer.h[0].attn.mixer.l_max == 32  # from config.n_positions
    # H3 has a recurrent step: the cache stays on, and generation uses it (see the cached test).
    assert model.config.use_cache is True and any("H3.step" in note for note in report.notes)
    ids = torch.randint(0, 64, (2, 20))
    logits = model(ids).logits
    assert logits.shape == (2, 20, 64)
    ids2 = ids.clone()
    ids2[:, 12:] = (ids[:, 12:] + 1) % 64
    diff = model(ids2).logits - logits
    assert diff[:, :12].abs().max() < 1e-10 and diff[:, 12:].abs().max() > 1e-6


def test_gpt2_padding_mask():
    model = tiny_gpt2().double()
    swap_attention(model, "longconv")
    ids = torch.randint(0, 64, (2, 16))
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[0, :4] = 0  # left padding
    ids2 = ids.clone()
    ids2[0, :4] = (ids[0, :4] + 7) % 64
    real = attention_mask.bool()
    # Position embeddings still see the pads' positions; their content must not matter.
    a = model(ids, attention_mask=attention_mask).logits
    b = model(ids2, attention_mask=attention_mask).logits
    torch.testing.assert_close(a[real], b[real])
    assert (model(ids2).logits - a)[real].abs().max() > 1e-6


def test_gpt2_refusals_and_cross_attention():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="GPT-2 attention at transformer.h.0.attn is causal .* but mixer 'butterfly' "
                       ".* is not causal; use a causal configuration"):
        swap_attention(model, "butterfly")
    swap_attention(model, "butterfly", learn_butterfly=False)
    with pytest.raises(ValueError, match="keeps no KV cache; call the model with use_cache=False"):
        model(torch.randint(0, 64, (1, 8)), use_cache=True)
    cross = tiny_gpt2(add_cross_attention=True)
    report = swap_attention(cross, "h3")
    assert len(report.swapped) == 2
    assert [p for p, _ in report.kept] == ["transformer.h.0.crossattention", "transformer.h.1.crossattention"]


def test_gpt2_swapped_compiles_and_trains():
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=1)
    swap_attention(model, "h3", head_dim=2)
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 24))
    losses = []
    for _ in range(6):
        loss = compiled(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_swapped_save_pretrained_reloads_with_the_swap(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = tiny_gpt2()
    report = swap_attention(model, "longconv", smooth_radius=1)
    assert any("load_swapped_pretrained" in note for note in report.notes)
    with torch.no_grad():  # weights unlike any fresh initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 20))
    expected = model(ids).logits

    reloaded = load_swapped_pretrained(GPT2LMHeadModel, str(tmp_path))
    assert isinstance(reloaded.transformer.h[0].attn, GPT2SelfMixer) and not reloaded.training
    assert reloaded.transformer.h[0].attn.mixer.smooth_radius == 1
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # tie kept
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)

    # By hand: re-apply the same swap, then load the state dict.
    from safetensors.torch import load_file

    by_hand = tiny_gpt2()
    swap_attention(by_hand, "longconv", smooth_radius=1)
    by_hand.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    torch.testing.assert_close(by_hand.eval()(ids).logits, expected, rtol=0, atol=0)

    # What the plain class does (why this function exists): attention comes back freshly initialised.
    plain = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    assert (plain(ids).logits - expected).abs().max() > 1e-3


def test_load_swapped_pretrained_refuses_plain_and_mismatched_checkpoints(tmp_path):
    from transformers import GPT2LMHeadModel

    tiny_gpt2().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no `lcconv_swap` entry.* load it with GPT2LMHeadModel.from_pretrained"):
        load_swapped_pretrained(GPT2LMHeadModel, str(tmp_path / "plain"))
    model = tiny_gpt2()
    swap_attention(model, "h3")
    model.config.lcconv_swap["mixer"] = "longconv"  # config says one mixer, weights hold another
    model.save_pretrained(tmp_path / "edited")
    with pytest.raises(ValueError, match="does not match the swapped GPT2LMHeadModel .*missing: \\['transformer.h.0.attn.mixer"):
        load_swapped_pretrained(GPT2LMHeadModel, str(tmp_path / "edited"))


def _cache_of(output):
    """The model output's cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cache_keyword(model) -> str:
    """The keyword that passes a cache back in: ``cache`` from transformers 5.24 (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def test_gpt2_cached_generation_runs_the_recurrent_step(monkeypatch):
    torch.manual_seed(0)
    model = tiny_gpt2(pad_token_id=0).double().eval()
    swap_attention(model, "h3", head_dim=2)
    ids = torch.randint(1, 64, (2, 7))
    more = torch.randint(1, 64, (2, 3))
    full = model(torch.cat([ids, more], 1), use_cache=False).logits
    prompt = model(ids, use_cache=True)
    assert _cache_of(prompt).get_seq_length() == 7  # positions of the next tokens stay right
    torch.testing.assert_close(prompt.logits, full[:, :7], rtol=1e-10, atol=1e-10)
    steps = []
    mixer = model.transformer.h[0].attn.mixer
    real_step = mixer.step
    monkeypatch.setattr(mixer, "step", lambda x_t, state: steps.append(1) or real_step(x_t, state))
    cont = model(more, **{_cache_keyword(model): _cache_of(prompt)}, use_cache=True)
    assert len(steps) == 3  # one step per new token, the prefix is not recomputed
    torch.testing.assert_close(cont.logits, full[:, 7:], rtol=1e-10, atol=1e-10)
    monkeypatch.undo()
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    recomputed = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 13) and torch.equal(cached, recomputed)


def test_gpt2_cached_generation_refusals_and_mixers_without_step():
    model = tiny_gpt2(pad_token_id=0).eval()
    swap_attention(model, "h3")
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="cached generation with a swapped mixer does not support padding"):
        model(ids, attention_mask=mask, use_cache=True)
    with pytest.raises(ValueError, match="the cache was reordered \\(beam search\\)"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    no_step = tiny_gpt2()
    report = swap_attention(no_step, "h3-longconv")  # a learned kernel: no recurrence
    assert no_step.config.use_cache is False and any("use_cache set to False" in note for note in report.notes)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_gpt2_mixer_takes_the_cache_under_either_name(keyword):
    """transformers 5.24 passes the cache as ``cache=``, earlier 5.x as ``past_key_values=``: the
    swapped mixer steps through it under either name, whichever transformers is installed."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = tiny_gpt2().double().eval()
    swap_attention(model, "h3", head_dim=2)
    block = model.transformer.h[0].attn
    x = torch.randn(2, 5, model.config.n_embd, dtype=torch.float64)
    want, _ = block(x)  # no cache: the full-length convolution
    cache = DynamicCache()
    got, _ = block(x, **{keyword: cache})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length() == 5  # stepped, with one placeholder key per token


# ----------------------------------------------------------- a new model family: one handler --
class ToySelfAttention(nn.Module):
    """A third-party model family's self-attention: x (B, L, d) -> (B, L, d), always causal."""

    def __init__(self, d_model):
        super().__init__()
        self.d_model = d_model
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.proj(x)


class ToyMixer(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x):
        return self.mixer(x)


@pytest.fixture
def toy_handler():
    from lcconv_compile.models import swap

    saved = list(swap._HANDLERS)
    finished = []

    def plan(ctx, path, module):
        from lcconv_compile.models.mixers import make_mixer

        new = make_mixer(ctx.mixer, module.d_model, ctx.l_max, **ctx.mixer_options)
        ctx.plan("toy", path, module, ToyMixer(new))
        ctx.report.swapped.append(swap.SwappedModule(path, type(module).__name__, type(new).__name__, "causal"))
        ctx.handled.add(id(module))

    handler = swap.register_swap_handler(swap.SwapHandler(
        "toy", lambda module: isinstance(module, ToySelfAttention), plan,
        lambda model, ctx: finished.append(len(ctx.planned("toy")))))
    yield handler, finished
    swap._HANDLERS[:] = saved


def test_a_new_model_family_is_one_registered_handler(toy_handler):
    handler, finished = toy_handler
    from lcconv_compile.models.swap import swap_handlers

    assert [h.name for h in swap_handlers()] == ["torch", "gpt2", "toy"]
    model = nn.Sequential(ToySelfAttention(8), nn.GELU(), ToySelfAttention(8))
    report = swap_attention(model, "h3")
    assert [s.path for s in report.swapped] == ["0", "2"] and finished == [2]
    assert isinstance(model[0], ToyMixer) and isinstance(model[2], ToyMixer)
    x = torch.randn(2, 12, 8)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # Causal: a later input never changes an earlier output.
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 8)
    torch.testing.assert_close(model(x2)[:, :7], y[:, :7])


def test_without_its_handler_a_family_is_kept_and_named():
    model = nn.Sequential(ToySelfAttention(8))
    with pytest.raises(ValueError, match="unsupported attention class ToySelfAttention"):
        swap_attention(model, "h3")
