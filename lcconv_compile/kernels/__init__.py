"""Triton kernels and their launchers. Knows torch and Triton only: no torch.library, no Inductor."""
