"""What every benchmark script shares: the measured copy bandwidth (for the memory floor), the
commit a run measures and the peak memory of one step. Measures only; asserts nothing about speed.

Scripts import it as ``from common import ...`` (they run as ``python benchmarks/<script>.py``,
which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import subprocess

import torch


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy (random data)."""
    import triton  # only where a GPU benchmark runs

    src = torch.randn(256 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def git_commit() -> str:
    """The commit measured: $LCCONV_COMMIT (a copied tree may have no .git, or a stale one), else
    git, else "unknown"."""
    if os.environ.get("LCCONV_COMMIT"):
        return os.environ["LCCONV_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
