"""Inductor integration: graph passes that rewrite FFT-convolution idioms into ``lcconv::fftconv``."""
