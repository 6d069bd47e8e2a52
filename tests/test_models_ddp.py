"""Data parallel training: a compiled H3 language model under DistributedDataParallel, two CPU
processes talking gloo, takes the same steps as one process on the same global batch.

Each rank trains on its half of every global batch; DDP averages the gradients, which for a
mean loss over equal halves is the gradient of the global batch's mean loss. So after each step
both ranks hold identical parameters (one all-reduce gives both the same gradients), equal to
those of a single process trained on the whole batch up to float32 summation order.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from inputs import rel_err
from lcconv_compile.models import LongConvLM

WORLD, STEPS, GLOBAL_BATCH, SEQLEN, VOCAB = 2, 3, 4, 32, 16
DEADLINE_S = 600  # both ranks compile the model first (tens of seconds each on 2 cores)


def make_model() -> LongConvLM:
    torch.manual_seed(0)  # every rank and the single process start from the same weights
    return LongConvLM(VOCAB, d_model=16, n_layers=1, l_max=None, mixer="h3")


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQLEN + 1), generator=generator) for _ in range(STEPS)]


def train(model, parameters, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS of SGD on this rank's share of each global batch; the losses it saw."""
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    losses = []
    for tokens in global_batches():
        share = tokens.chunk(world)[rank]
        logits = model(share[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), share[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        compiled = torch.compile(DistributedDataParallel(model))
        losses = train(compiled, model.parameters(), rank, WORLD)
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        torch.save({"losses": losses, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path) -> list[dict]:
    context = mp.start_processes(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP ranks did not finish within {DEADLINE_S} s")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_compiled_h3_lm_under_ddp_matches_one_process(tmp_path):
    ranks = _run_ranks(tmp_path)

    model = make_model()
    single_losses = train(torch.compile(model), model.parameters())

    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"{name}: the ranks diverged"
    start = dict(make_model().named_parameters())
    for name, p in model.named_parameters():
        moved = (p.detach() - start[name].detach()).norm()
        if moved > 0:  # compare the update, which is what the gradients decide
            assert rel_err(ranks[0]["params"][name] - start[name].detach(), p.detach() - start[name].detach()) < 1e-4, name
    # The global loss is the mean of the two halves' losses.
    for step, loss in enumerate(single_losses):
        mean_of_ranks = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert abs(mean_of_ranks - loss) < 1e-5 * max(1.0, abs(loss)), step


# The script's runs go where the machine allows: with a GPU per rank on CUDA (NCCL), else on CPU
# (gloo), e.g. on a one-GPU machine, where two ranks cannot each have a GPU. The 2-rank runs
# choose for themselves (--device auto, the default, which is what is tested); the single process
# is told the same device, and all use float32, so that the loss curves are comparable.
SCRIPT_DEVICE = "cuda" if torch.cuda.device_count() >= WORLD else "cpu"
# CPU: float32 summation order only. CUDA: also our kernels' fixed-order reductions over a batch
# of 2 rows (DDP) instead of 4 (one process): a few ulps per step, grown through 4 AdamW steps.
SCRIPT_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}[SCRIPT_DEVICE]


def _multi_gpu_script(tmp_path, strategy: str, device: str) -> dict:
    """benchmarks/train_multi_gpu.py at tiny sizes, alone or under torchrun with 2 ranks, with
    ``--device device``; the JSON it writes, after checking it ran on SCRIPT_DEVICE."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / f"{strategy}.json"
    launcher = [sys.executable] if strategy == "single" else [sys.executable, "-m", "torch.distributed.run",
                                                              "--nproc-per-node", str(WORLD)]
    command = launcher + [str(root / "benchmarks" / "train_multi_gpu.py"), "--strategy", strategy, "--d-model", "16",
                          "--n-layers", "1", "--seq-len", "64", "--global-batch", "4", "--vocab-size", "16",
                          "--steps", "4", "--no-compile", "--device", device, "--dtype", "fp32",
                          "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    # It says where it ran, on stderr and in the JSON.
    backend = None if strategy == "single" else {"cpu": "gloo", "cuda": "nccl"}[SCRIPT_DEVICE]
    assert result["device"].split(":")[0] == SCRIPT_DEVICE and result["backend"] == backend, result
    assert f"on {SCRIPT_DEVICE}" in done.stderr and result["device_reason"] in done.stderr
    return result


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.skipif(SCRIPT_DEVICE == "cuda" and not dist.is_nccl_available(), reason="needs NCCL for CUDA ranks")
def test_multi_gpu_script_ddp_and_fsdp2_follow_the_single_process_loss_curve(tmp_path):
    single = _multi_gpu_script(tmp_path, "single", SCRIPT_DEVICE)["losses"]
    assert single[-1] < single[0]  # it trains
    for strategy in ("ddp", "fsdp"):
        result = _multi_gpu_script(tmp_path, strategy, "auto")
        assert result["world_size"] == WORLD
        losses = result["losses"]
        assert len(losses) == len(single)
        for step, (got, want) in enumerate(zip(losses, single)):
            assert abs(got - want) < SCRIPT_TOLERANCE * max(1.0, abs(want)), (strategy, step, got, want)


def test_multi_gpu_script_falls_back_to_cpu_without_a_gpu_per_rank(monkeypatch):
    """Two ranks on a one-GPU machine (the GPU suite's machine) run on CPU with gloo, and say so;
    --device cuda refuses rather than fall back; --device cpu is honoured with GPUs present."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_multi_gpu.py"
    spec = importlib.util.spec_from_file_location("train_multi_gpu", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert script.choose_device("auto", 1) == ("cuda", "1 CUDA device for 1 rank")
    kind, why = script.choose_device("auto", 2)
    assert kind == "cpu" and why == "1 CUDA device for 2 ranks: CPU and gloo"
    with pytest.raises(SystemExit, match="--device cuda: 1 CUDA device for 2 ranks"):
        script.choose_device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert script.choose_device("auto", 2)[0] == "cuda"
    assert script.choose_device("cpu", 2)[0] == "cpu"
