"""Data-parallel training of a compiled H3 language model: one process, DDP or FSDP2.

Run it alone for the single-device baseline, or under torchrun for several devices::

    python benchmarks/train_multi_gpu.py --strategy single --json single.json
    torchrun --nproc-per-node 2 benchmarks/train_multi_gpu.py --strategy ddp --json ddp.json
    torchrun --nproc-per-node 2 benchmarks/train_multi_gpu.py --strategy fsdp --json fsdp.json

Where it runs (``--device``, default ``auto``): on CUDA (NCCL between ranks) when the machine has
a GPU for each rank on it, else on CPU (gloo), e.g. two ranks on a one-GPU machine; ``--device
cpu`` asks for CPU and gloo anywhere, ``--device cuda`` refuses to fall back. Rank 0 says which
it used, and why, on stderr and in the JSON (``device``, ``backend``, ``device_reason``).

Every run trains on the same global batches (associative-recall sequences from one seed, next-token
loss on every position); each of the W ranks takes its 1/W share, so the averaged gradient is the
global batch's and the loss curves of all three runs should agree up to bf16 rounding. It prints
and writes (rank 0) the per-step global loss, the step time and tokens/s. On CPU (gloo) it runs
at small sizes for the tests; the numbers that matter come from GPUs (issue 13).

It holds the training loop only: the model is ``LongConvLM(mixer="h3")``, the data the synthetic
task generator, the parallelism PyTorch's own (``DistributedDataParallel``, ``fully_shard``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lcconv_compile.models import LongConvLM
from lcconv_compile.provenance import run_metadata, write_results
from lcconv_compile.models.synthetic import associative_recall

STRATEGIES = ("single", "ddp", "fsdp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--strategy", choices=STRATEGIES, default="single")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, over all ranks")
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when there is a GPU for every rank on this machine, else CPU (gloo)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="autocast (default: bf16 on cuda)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="rank 0 writes config, losses and timings here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    return args


def choose_device(requested: str, local_ranks: int) -> tuple[str, str]:
    """("cuda" or "cpu", why) for ``local_ranks`` processes on this machine, one GPU each.

    Every rank of the machine sees the same GPU count, so all of them choose alike. A rank
    without a GPU of its own cannot use CUDA (torch.cuda.set_device(1) on a one-GPU machine
    fails with "invalid device ordinal"), so ``auto`` falls back to CPU and gloo."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = f"{gpus} CUDA device{'s' if gpus != 1 else ''} for {local_ranks} rank{'s' if local_ranks != 1 else ''}"
    if requested == "cpu":
        return "cpu", f"--device cpu ({have})"
    if gpus >= local_ranks:
        return "cuda", have
    if requested == "cuda":
        raise SystemExit(f"--device cuda: {have} on this machine; run fewer ranks or --device auto/cpu")
    return "cpu", f"{have}: CPU and gloo"


def setup(strategy: str, requested: str) -> tuple[int, int, torch.device, str, str]:
    """(rank, world size, device, backend, why this device); initialises the process group under
    torchrun (backend None for a single process)."""
    if strategy == "single":
        kind, why = choose_device(requested, 1)
        return 0, 1, torch.device(kind), None, why
    if "RANK" not in os.environ:
        raise SystemExit(f"--strategy {strategy} runs under torchrun (e.g. torchrun --nproc-per-node 2 {sys.argv[0]})")
    kind, why = choose_device(requested, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    if kind == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank), "nccl", why
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu"), "gloo", why


def build(args, device: torch.device, world: int):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = LongConvLM(args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, l_max=None, mixer="h3")
    model = model.to(device)
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif args.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = model
    runner = torch.compile(wrapped) if args.compile else wrapped
    return wrapped, runner


def global_batch(args, step: int, device: torch.device):
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return associative_recall(args.global_batch, args.seq_len, args.vocab_size, generator=generator)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device, backend, device_reason = setup(args.strategy, args.device)
    if args.dtype is None:  # from the device chosen, not from whether the machine has a GPU
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if rank == 0:
        print(f"{args.strategy} x{world} on {device.type}" + (f" ({backend})" if backend else "")
              + f": {device_reason}; {args.dtype}", file=sys.stderr)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the world size {world}")
    model, runner = build(args, device, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    losses, step_s = [], []
    share = args.global_batch // world
    for step in range(args.steps):
        batch = global_batch(args, step, device)
        inputs = batch.inputs[rank * share:(rank + 1) * share].to(device)
        targets = batch.targets[rank * share:(rank + 1) * share].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            logits = runner(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab_size), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        global_loss = loss.detach()
        if world > 1:
            dist.all_reduce(global_loss)
            global_loss = global_loss / world
        losses.append(global_loss.item())  # also waits for the step
        step_s.append(time.perf_counter() - start)
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} {step_s[-1] * 1e3:.1f} ms", file=sys.stderr)
    timed = step_s[min(5, len(step_s) - 1):]  # the first steps compile
    step_ms = 1e3 * sorted(timed)[len(timed) // 2]
    result = {
        "config": vars(args), "world_size": world, "device": str(device), "backend": backend,
        "device_reason": device_reason,
        "losses": losses, "step_ms": [1e3 * s for s in step_s], "median_step_ms": step_ms,
        "tokens_per_s": args.global_batch * args.seq_len / (step_ms / 1e3),
    }
    if rank == 0:
        print(f"{args.strategy} x{world}: median step {step_ms:.1f} ms, {result['tokens_per_s']:.0f} tokens/s",
              file=sys.stderr)
        if args.json:
            write_results(args.json, result, run_metadata(device))
    if world > 1:
        # The wrapped model (DDP's reducer, FSDP2's hooks) holds the gloo process group. Left to the
        # interpreter's finalisation, the group's worker threads die after the GIL is gone and the
        # process aborts ("terminate called without an active exception"; pytorch/pytorch#179291,
        # #190489): without the barrier and destroy, 4 of 9 FSDP2 runs aborted; with them, CI still
        # caught one DDP abort. So the model is released first, then the group.
        del model, runner, optimizer, logits, loss
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    distributed = main()["world_size"] > 1
    if distributed:
        # Everything is written and the group is destroyed. Skip the interpreter's finalisation,
        # where a gloo thread that outlived the group can still abort the process (see above);
        # an error before this point still exits non-zero through the traceback.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
