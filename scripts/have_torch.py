"""Exit 0 if a torch >= 2.11 is importable (then the Makefile keeps it), 1 otherwise."""

import sys

try:
    import torch
except ImportError:
    sys.exit(1)
major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
