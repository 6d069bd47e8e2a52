"""models/synthetic.py and models/train_synthetic.py: task generators and the training script."""

import json

import pytest
import torch

from lcconv_compile.models import train_synthetic
from lcconv_compile.models.synthetic import SEP, associative_recall, induction_head


def recall_by_scan(tokens):
    """The value that followed the last earlier occurrence of the final query key."""
    query = tokens[-1]
    for i in range(len(tokens) - 3, -1, -1):
        if tokens[i] == query:
            return tokens[i + 1]
    raise AssertionError("query key never appeared")


@pytest.mark.parametrize("seq_len", [4, 5, 64, 129])
def test_associative_recall(seq_len):
    batch = associative_recall(16, seq_len, vocab_size=12)
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (16, seq_len)
    torch.testing.assert_close(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert (batch.inputs[:, -2] == SEP).all()
    n_keys = (12 - 2) // 2
    for row in range(16):
        tokens = batch.inputs[row].tolist()
        assert batch.answers[row].item() == recall_by_scan(tokens)
        # One map per sequence: a key is always followed by the same value.
        pairs = {(tokens[i], tokens[i + 1]) for i in range(len(tokens) - 2) if 2 <= tokens[i] < 2 + n_keys}
        assert len({k for k, _ in pairs}) == len(pairs)
        # The loss mask is the value positions and the answer.
        masked = batch.loss_mask[row].nonzero().flatten().tolist()
        assert masked[-1] == seq_len - 1
        assert all(2 + n_keys <= batch.targets[row, i] for i in masked)


@pytest.mark.parametrize("seq_len", [3, 50])
def test_induction_head(seq_len):
    batch = induction_head(16, seq_len, vocab_size=10)
    assert batch.inputs.shape == (16, seq_len)
    assert (batch.inputs[:, -1] == SEP).all()
    assert ((batch.inputs == SEP).sum(1) == 2).all()
    for row in range(16):
        tokens = batch.inputs[row].tolist()
        first = tokens.index(SEP)
        assert batch.answers[row].item() == tokens[first + 1]
    assert batch.loss_mask.sum().item() == 16 and batch.loss_mask[:, -1].all()


def test_generators_are_reproducible_and_fresh():
    a = associative_recall(4, 32, generator=torch.Generator().manual_seed(1))
    b = associative_recall(4, 32, generator=torch.Generator().manual_seed(1))
    c = associative_recall(4, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)


def test_bad_task_configuration():
    with pytest.raises(ValueError, match="seq_len must be >= 4, got 3"):
        associative_recall(2, 3)
    with pytest.raises(ValueError, match="vocab_size must be >= 4 .* got 3"):
        associative_recall(2, 8, vocab_size=3)


@pytest.mark.parametrize("mixer", ["h3", "h3-longconv", "butterfly"])
def test_training_script_runs_and_writes_json(mixer, tmp_path, capsys):
    out = tmp_path / "result.json"
    result = train_synthetic.main(
        ["--mixer", mixer, "--task", "recall", "--seq-len", "16", "--steps", "4", "--batch-size", "4",
         "--d-model", "16", "--device", "cpu", "--eval-batches", "1", "--warmup-steps", "1", "--json", str(out)]
    )
    captured = capsys.readouterr()
    assert "final: answer_accuracy=" in captured.out
    assert "4/4" in captured.err and "tok/s" in captured.err
    saved = json.loads(out.read_text())
    assert saved["answer_accuracy"] == result["answer_accuracy"] and 0.0 <= saved["answer_accuracy"] <= 1.0
    assert saved["train_tokens_per_s"] > 0 and len(saved["history"]) == 4
    assert saved["answer_only_loss"] == (mixer == "butterfly")


def test_training_script_passes_longconv_options():
    args = train_synthetic.parse_args(["--mixer", "h3-longconv", "--seq-len", "16", "--d-model", "16",
                                       "--head-dim", "4", "--squash-lambda", "0.01", "--smooth-radius", "2"])
    layer = train_synthetic.build_model(args).blocks[0].mixer
    assert (layer.kernel_type, layer.head_dim, layer.squash_lambda, layer.smooth_radius) == ("longconv", 4, 0.01, 2)
    assert layer.kernel_weight.shape == (4, 16)


def test_training_script_help_shows_defaults_and_device_default(capsys):
    with pytest.raises(SystemExit):
        train_synthetic.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap with the terminal width
    assert "(default: h3)" in text and "optimizer steps (default: 300)" in text and "(default: None)" not in text
    assert "--compile torch.compile the model (default: False)" in text
    assert "64 with --device cpu, 1024 with cuda" in text
    assert train_synthetic.parse_args(["--device", "cpu"]).seq_len == 64
    assert train_synthetic.parse_args(["--device", "cuda"]).seq_len == 1024  # parsing only: no GPU needed
    assert train_synthetic.parse_args(["--device", "cpu", "--seq-len", "32"]).seq_len == 32


def _tiny_run(tmp_path, *extra):
    return ["--mixer", "h3", "--seq-len", "16", "--steps", "4", "--batch-size", "4", "--d-model", "16",
            "--device", "cpu", "--eval-batches", "1", "--eval-every", "2", "--warmup-steps", "1", *extra]


def test_training_script_progress_checkpoint_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_synthetic.Progress, "__init__", _every_step_progress)
    checkpoint = tmp_path / "model.pt"
    extra = ["--checkpoint", str(checkpoint)]
    result = train_synthetic.main(_tiny_run(tmp_path, *extra))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "/4 " in line]
    assert "nan" not in err and lines[0].startswith("[") and "acc - (first eval at step 2)" in lines[0]
    assert "tok/s after warm-up" in lines[0] and "acc -" not in lines[-1]
    saved = torch.load(checkpoint)
    assert saved["config"]["seq_len"] == 16 and saved["config"]["mixer"] == "h3"
    reloaded = train_synthetic.build_model(train_synthetic.parse_args(_tiny_run(tmp_path)))
    reloaded.load_state_dict(saved["model"])  # strict: every key of the trained model
    ids = torch.randint(2, 20, (2, 16))
    assert torch.isfinite(reloaded(ids)).all()
    assert result["history"][-1]["step"] == 4


def test_training_script_writes_a_png_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the test extra) is not installed")
    plot = tmp_path / "curves.png"
    train_synthetic.main(_tiny_run(tmp_path, "--plot", str(plot)))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_training_script_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="--plot needs matplotlib, which is not installed: `pip install matplotlib`"):
        train_synthetic.parse_args(_tiny_run(tmp_path, "--plot", str(tmp_path / "x.png")))


def _every_step_progress(self, total, stream=None):
    import sys
    import time

    self.total, self.stream, self.tty, self.every = total, sys.stderr, False, 1
    self.start = time.perf_counter()
