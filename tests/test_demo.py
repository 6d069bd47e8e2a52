"""The README's main job (``make demo``) runs end to end and reports the rewrite it promises."""

from lcconv_compile import demo


def test_demo_runs_and_shows_the_rewrite(capsys):
    demo.main()
    out = capsys.readouterr().out
    assert "eager and torch.compile agree" in out
    assert "rewritten into lcconv::fftconv (1)" in out and "fold_gelu" in out
