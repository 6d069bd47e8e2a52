"""What a results file records about the run that made it: the ``meta`` block that every JSON under
``benchmarks/results/`` carries, in one format (``scripts/results_index.py`` reads it into
``benchmarks/results/INDEX.md``, and a CPU test checks every committed file against it).

Keys: schema, date (UTC), device (its name), commit, command (how to run it again), torch, triton,
python. It reads the environment only: it measures nothing and launches nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Optional, Sequence

import torch

__all__ = ["REQUIRED_KEYS", "SCHEMA", "device_name", "git_commit", "run_metadata", "write_results"]

SCHEMA = "lcconv-results/1"
REQUIRED_KEYS = ("schema", "date", "device", "commit", "command", "torch", "triton")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """The commit measured: $LCCONV_COMMIT (a copied tree may have no .git, or a stale one), else
    git, else "unknown"."""
    if os.environ.get("LCCONV_COMMIT"):
        return os.environ["LCCONV_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=_REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: Optional[torch.device | str] = None) -> str:
    """The GPU's name for a CUDA device (the current one by default when CUDA is there), else the
    CPU's ("cpu" where the platform does not say)."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def _command(argv: Sequence[str]) -> str:
    """``python <script relative to the repository> <arguments>`` (``-m module`` for a module)."""
    script, *rest = argv
    path = os.path.abspath(script)
    if path.startswith(_REPO + os.sep):
        relative = os.path.relpath(path, _REPO)
        if relative.startswith("lcconv_compile" + os.sep):
            return shlex.join(["python", "-m", relative[:-3].replace(os.sep, "."), *rest])
        script = relative
    return shlex.join(["python", script, *rest])


def run_metadata(device: Optional[torch.device | str] = None, argv: Optional[Sequence[str]] = None) -> dict:
    """The ``meta`` block of a results file made now, on ``device``, by the command ``argv``
    (default: this process's)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # macOS and Windows wheels of torch come without Triton
        triton_version = None
    return dict(schema=SCHEMA, date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                device=device_name(device), commit=git_commit(), command=_command(argv or sys.argv),
                torch=torch.__version__, triton=triton_version, python=platform.python_version())


def write_results(path: str, payload: dict, meta: Optional[dict] = None, **json_options: Any) -> dict:
    """Write ``{"meta": meta, **payload}`` as JSON to ``path`` (``meta`` defaults to
    :func:`run_metadata` of the current device); returns what was written."""
    if "meta" in payload:
        raise ValueError("write_results: the payload must not have its own 'meta' key")
    result = {"meta": meta if meta is not None else run_metadata(), **payload}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=json_options.get("indent", 1))
    return result
