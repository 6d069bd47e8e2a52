"""nn.Modules built on ``lcconv_compile.fftconv`` in plain PyTorch (LongConv, H3, ...)."""
