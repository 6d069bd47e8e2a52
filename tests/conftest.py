"""Shared test set-up: Triton interpreter on CPU-only machines, and a fresh random seed per test
(printed, so a failure can be replayed)."""

import os

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors (kernel tests, small
# sizes). Set before lcconv_compile imports Triton: triton.jit reads it at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed():
    """Seed torch from the OS for every test; LCCONV_TEST_SEED=<n> replays a failing run."""
    seed = int(os.environ.get("LCCONV_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"LCCONV_TEST_SEED={seed}")
    yield seed


def pytest_report_header(config):
    import lcconv_compile

    return f"torch {torch.__version__}, lcconv_compile {lcconv_compile.__version__}"


@pytest.fixture
def fresh_compile():
    """A clean torch.compile state around the test: no graphs, guards or recompile counts from
    earlier tests (which would hide a recompilation or serve a graph compiled for other code)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
