"""What every benchmark script shares: the measured copy bandwidth (for the memory floor), the
peak memory of one step, and (from lcconv_compile.provenance) the one ``meta`` block every
results JSON carries (the commit a run measures among it). Measures only; asserts nothing about speed.

Scripts import it as ``from common import ...`` (they run as ``python benchmarks/<script>.py``,
which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import torch

from lcconv_compile.provenance import run_metadata, write_results  # noqa: F401  (re-exported)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy (random data)."""
    import triton  # only where a GPU benchmark runs

    src = torch.randn(256 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def peak_memory_bytes(step) -> int:
    """Peak bytes allocated by ``step()`` above what was allocated before it (torch's caching
    allocator: tensors only, not the allocator's slack)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
