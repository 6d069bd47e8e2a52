"""models/lm.py and models/attention.py: the LM with every mixer, causality, tying, training, errors."""

import pytest
import torch
import torch.nn.functional as F

from lcconv_compile.models import MIXERS, Attention, LongConvLM, make_mixer

CAUSAL_CONFIGS = [
    ("h3", {}),
    ("h3", {"head_dim": 2}),
    ("longconv", {}),
    ("butterfly", {"learn_butterfly": False}),
    ("attention", {}),
]


@pytest.mark.parametrize("mixer,options", CAUSAL_CONFIGS)
def test_lm_shapes_and_causality(mixer, options):
    model = LongConvLM(50, d_model=16, n_layers=2, l_max=32, mixer=mixer, mixer_options=options).double()
    for block in model.blocks:
        if hasattr(block.mixer, "reset_butterfly"):
            block.mixer.reset_butterfly()  # exact factors in float64, not float32 ones cast up
    ids = torch.randint(0, 50, (2, 32))
    logits = model(ids)
    assert logits.shape == (2, 32, 50) and logits.dtype == torch.float64
    ids2 = ids.clone()
    ids2[:, 20:] = torch.randint(0, 50, (2, 12))
    ids2[:, 20] = (ids[:, 20] + 1) % 50  # certainly different
    diff = model(ids2) - logits
    assert diff[:, :20].abs().max() < 1e-10 and diff[:, 20:].abs().max() > 1e-6


def test_head_is_tied_and_every_parameter_gets_a_gradient():
    model = LongConvLM(30, d_model=16, n_layers=2, l_max=16, mixer="h3")
    assert model.head.weight is model.embedding.weight
    ids = torch.randint(0, 30, (3, 16))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mixer", ["h3", "attention"])
def test_a_few_steps_reduce_the_loss(mixer):
    model = LongConvLM(20, d_model=32, n_layers=1, l_max=24, mixer=mixer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 20, (8, 25))  # a fixed batch: the loss must go down on it
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_compiled_lm_equals_eager():
    model = LongConvLM(40, d_model=16, n_layers=2, l_max=32, mixer="longconv")
    ids = torch.randint(0, 40, (2, 32))
    logits_c = torch.compile(model, fullgraph=True)(ids)
    torch.testing.assert_close(logits_c, model(ids), rtol=1e-5, atol=1e-5)


def test_butterfly_lm_works_with_its_defaults():
    # A causal LM keeps the butterfly factors exact (buffers): causal, and trains like LongConv.
    model = LongConvLM(10, d_model=8, l_max=8, mixer="butterfly")
    mixer = model.blocks[0].mixer
    assert mixer.is_causal and not mixer.learn_butterfly and "in_factor" not in dict(model.named_parameters())
    ids = torch.randint(0, 10, (2, 8))
    logits = model(ids)
    ids2 = ids.clone()
    ids2[:, 5:] = (ids[:, 5:] + 1) % 10
    diff = model(ids2) - logits
    assert diff[:, :5].abs().max() < 1e-5 and diff[:, 5:].abs().max() > 1e-4
    model(ids).sum().backward()
    assert mixer.kernel_weight.grad is not None


def test_non_causal_mixer_needs_causal_false():
    with pytest.raises(ValueError, match=r"mixer 'butterfly' with options \{'learn_butterfly': True\} is not causal"):
        LongConvLM(10, d_model=8, l_max=8, mixer="butterfly", mixer_options={"learn_butterfly": True})
    with pytest.raises(ValueError, match="mixer 'longconv' with options \\{'bidirectional': True\\} is not causal"):
        LongConvLM(10, d_model=8, l_max=8, mixer="longconv", mixer_options={"bidirectional": True})
    model = LongConvLM(10, d_model=8, l_max=8, mixer="butterfly", causal=False)
    assert not model.causal and model.blocks[0].mixer.learn_butterfly  # non-causal LM: learned factors


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown mixer 'mamba'; choose one of 'h3', 'h3-longconv', 'longconv', 'butterfly', 'attention'"):
        LongConvLM(10, d_model=8, l_max=8, mixer="mamba")
    with pytest.raises(ValueError, match="d_model = 12 is not divisible by head_dim = 5"):
        LongConvLM(10, d_model=12, l_max=8, mixer="h3", mixer_options={"head_dim": 5})
    with pytest.raises(TypeError, match="mixer 'h3' \\(H3\\): .*bidirectional"):
        LongConvLM(10, d_model=8, l_max=8, mixer="h3", mixer_options={"bidirectional": True})
    with pytest.raises(ValueError, match="vocab_size must be a positive integer, got 0"):
        LongConvLM(0, d_model=8, l_max=8)
    model = LongConvLM(10, d_model=8, l_max=8)
    with pytest.raises(ValueError, match="L = 9 exceeds l_max = 8"):
        model(torch.randint(0, 10, (1, 9)))
    for name in ("longconv", "butterfly", "h3-longconv"):
        with pytest.raises(ValueError, match=r"l_max is required: the learned long kernel .* pass l_max="):
            make_mixer(name, 8, None)
    with pytest.raises(ValueError, match="mixer 'h3-longconv' sets kernel='longconv'; got kernel='ssm'"):
        make_mixer("h3-longconv", 8, 16, kernel="ssm")
    assert set(MIXERS) == {"h3", "h3-longconv", "longconv", "butterfly", "attention"}


def test_attention_mixer_padding_and_bidirectional():
    layer = Attention(16, n_heads=2).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, :3] = True
    x2 = x.clone()
    x2[pad] = torch.randn_like(x2[pad])
    torch.testing.assert_close(layer(x, pad)[~pad], layer(x2, pad)[~pad])
    bidirectional = Attention(16, n_heads=2, causal=False).double()
    x3 = x.clone()
    x3[:, 6:] = torch.randn_like(x3[:, 6:])
    assert (bidirectional(x3) - bidirectional(x))[:, :6].abs().max() > 1e-6
    with pytest.raises(ValueError, match="even head_dim"):
        Attention(6, n_heads=2)


def run_steps(step, inputs, state):
    """Feed ``inputs[:, t]`` to ``step`` one position at a time; stacked outputs and the last state."""
    outputs = []
    for t in range(inputs.shape[1]):
        out, state = step(inputs[:, t], state)
        outputs.append(out)
    return torch.stack(outputs, 1), state


def test_attention_step_equals_forward():
    layer = Attention(16, n_heads=2).double()
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    y, cache = run_steps(layer.step, x, layer.allocate_state(3, max_len=11))
    torch.testing.assert_close(y, layer(x), rtol=1e-10, atol=1e-12)
    assert cache.length == 11
    with pytest.raises(ValueError, match="the cache holds 11 tokens and is full"):
        layer.step(x[:, 0], cache)
    with pytest.raises(ValueError, match="decoding needs causal=True"):
        Attention(16, n_heads=2, causal=False).allocate_state(1, 4)


@pytest.mark.parametrize("mixer,options", [("h3", {"head_dim": 2}), ("attention", {})])
def test_lm_step_equals_forward(mixer, options):
    model = LongConvLM(30, d_model=16, n_layers=2, l_max=None, mixer=mixer, mixer_options=options).double()
    ids = torch.randint(0, 30, (2, 13))
    logits, _ = run_steps(model.step, ids, model.allocate_state(2, max_len=13))
    torch.testing.assert_close(logits, model(ids), rtol=1e-9, atol=1e-10)


def test_lm_step_refusals():
    with pytest.raises(ValueError, match="attention's KV cache needs max_len"):
        LongConvLM(10, d_model=8, l_max=None, mixer="attention").allocate_state(1)
    with pytest.raises(ValueError, match="mixer 'longconv' has no recurrent step"):
        LongConvLM(10, d_model=8, l_max=8, mixer="longconv").allocate_state(1)


def test_h3_longconv_lm_compiled_equals_eager():
    model = LongConvLM(40, d_model=16, n_layers=2, l_max=32, mixer="h3-longconv", mixer_options={"head_dim": 2})
    assert model.blocks[0].mixer.kernel_type == "longconv"
    ids = torch.randint(0, 40, (2, 32))
    torch.testing.assert_close(torch.compile(model)(ids), model(ids), rtol=1e-5, atol=1e-5)
