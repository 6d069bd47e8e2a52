"""Model benchmark: training step, inference forward and per-token generation of small LMs.

    python benchmarks/bench_models.py --out benchmarks/results/models_h100.json
    python benchmarks/bench_models.py --lengths 2048 8192 --variants h3 attention
    python benchmarks/bench_models.py --smoke --no-compile        # CPU, tiny sizes (tests)

Models (``LongConvLM``, 2 layers, d_model 768 by default, vocabulary 50304):

  h3           our H3 LM (``mixer="h3"``): convolutions through the ``lcconv::fftconv`` op
  h3-torchfft  the same model with every convolution as plain ``torch.fft`` ops
               (``models._conv.conv_implementation("reference")``) and our rewrites off
               (``passes_enabled(False)``): H3 compiled by Inductor alone
  h3-longconv  H3 with a learned long kernel (``mixer="h3-longconv"``), through the op
  h3-chunked   our H3 with state passing (``H3(state_chunk=--state-chunk)``): sequences longer
               than a chunk run chunk by chunk with the SSM state carried (``H3.prefill``)
  attention    SDPA attention LM of the same width (head_dim 64, rotary)

Ablation of our H3 (the layer as it was before a change, to time that change in one run):

  h3-transposed  q, k, v and the output projection's input as transposed views of nn.Linear
                 outputs (L stride = d_model), as stop 11 measured it
                 (``models._projections._CHANNELS_FIRST = False``)

Training: ``tokens`` tokens per step (B = tokens / L), bf16 autocast on CUDA (fp32 on CPU), AdamW,
the model and its loss compiled together with ``torch.compile`` (default options; dynamo is
reset before each model, so every length compiles with static shapes); the optimizer step runs
eagerly. ms/step is the median of ``--steps`` timed steps after ``--warmup`` steps (compilation
included in the warm-up and reported apart). Peak memory is ``max_memory_allocated`` over the
timed steps.

Inference: the compiled model's forward under ``no_grad`` at ``--infer-lengths`` (batch as in
training). Generation: ms per token of ``LongConvLM.step`` (eager) at batch ``--gen-batch``:
H3 keeps an O(1) state; attention reads a KV cache of ``--gen-context`` tokens. The states are
filled with random numbers instead of a prefill: a step's cost does not depend on their values.

Prints a table and, with ``--out``, writes JSON with the device, torch/triton versions and the
git commit. It measures and reports; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path

import lcconv_compile  # noqa: E402
from common import run_metadata, write_results  # noqa: E402  (this folder)
from lcconv_compile.models import LongConvLM  # noqa: E402
from lcconv_compile.models import _projections  # noqa: E402
from lcconv_compile.models._conv import conv_implementation  # noqa: E402

VARIANTS = {
    # name: (mixer, route convolutions through the reference math with our passes off)
    "h3": ("h3", False),
    "h3-torchfft": ("h3", True),
    "h3-longconv": ("h3-longconv", False),
    "h3-chunked": ("h3", False),
    "attention": ("attention", False),
    "h3-transposed": ("h3", False),
}
# Ablations: module switches (module, attribute, value) set while a variant compiles and runs.
SWITCHES = {"h3-transposed": ((_projections, "_CHANNELS_FIRST", False),)}
DEFAULT_VARIANTS = ("h3", "h3-torchfft", "attention")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per training step (B = tokens / L)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--head-dim", type=int, default=1, help="H3 head_dim")
    p.add_argument("--state-chunk", type=int, default=4096, help="h3-chunked: samples per chunk")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--infer-lengths", nargs="*", type=int, default=[4096], help="inference forward lengths")
    p.add_argument("--gen-context", type=int, default=4096, help="KV-cache length for attention generation")
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--no-generate", dest="generate", action="store_false", help="skip the generation rows")
    p.add_argument("--gen-tokens", type=int, default=32, help="timed generated tokens")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true",
                   help="training: CUDA time by kernel of one more step (torch.profiler), in the JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (other flags still apply), for a CPU check")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(lengths=[32, 64], tokens=128, d_model=32, vocab_size=64, warmup=1, steps=2,
                       infer_lengths=[64], gen_context=16, gen_batch=2, gen_tokens=3, state_chunk=16)
    args = p.parse_args(argv)
    for length in args.lengths:
        if args.tokens % length:
            p.error(f"--tokens {args.tokens} is not a multiple of the length {length}")
    return args


# ------------------------------------------------------------------------------- helpers --
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@contextlib.contextmanager
def _variant_context(name: str):
    """Everything a variant runs under, at compile time and at every call (dynamo guards on it)."""
    with contextlib.ExitStack() as stack:
        if VARIANTS[name][1]:
            stack.enter_context(lcconv_compile.passes_enabled(False))
            stack.enter_context(conv_implementation("reference"))
        for module, attribute, value in SWITCHES.get(name, ()):
            stack.callback(setattr, module, attribute, getattr(module, attribute))
            setattr(module, attribute, value)
        yield


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class LMLoss(torch.nn.Module):
    """The LM and its next-token loss as one module, so that both compile into one graph."""

    def __init__(self, model: LongConvLM):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _build(args, variant: str, seqlen: int, device: torch.device) -> LongConvLM:
    mixer = VARIANTS[variant][0]
    options = {"head_dim": args.head_dim} if mixer.startswith("h3") else {}
    if variant == "h3-chunked":
        options["state_chunk"] = args.state_chunk
    l_max = seqlen if mixer == "h3-longconv" else None
    torch.manual_seed(0)
    return LongConvLM(args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, l_max=l_max,
                      mixer=mixer, mixer_options=options).to(device)


def _timed(fn, device, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(seconds of the first call, ms of each timed call); ``fn`` runs warmup + steps times."""
    first_s, times = None, []
    for i in range(warmup + steps):
        if i == warmup:
            _peak_reset(device)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if i == 0:
            first_s = elapsed
        if i >= warmup:
            times.append(elapsed * 1e3)
    return first_s, times


# ---------------------------------------------------------------------------- measurements --
def bench_train(args, variant: str, seqlen: int, device: torch.device) -> dict:
    torch._dynamo.reset()
    batch = args.tokens // seqlen
    model = _build(args, variant, seqlen, device)
    lm_loss = LMLoss(model)
    runner = torch.compile(lm_loss) if args.compile else lm_loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(args.vocab_size, (batch, seqlen + 1), device=device, generator=generator)
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with _autocast(device):
            loss = runner(ids, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with _variant_context(variant):
        first_s, times = _timed(step, device, args.warmup, args.steps)
        profile = _profile(step, device) if args.profile else None
    ms = statistics.median(times)
    row = {"kind": "train", "variant": variant, "seqlen": seqlen, "batch": batch, "ms": ms,
           "tokens_per_s": args.tokens / ms * 1e3, "peak_mib": _peak_mib(device), "first_step_s": first_s,
           "times_ms": times}
    if profile is not None:
        row["profile"] = profile
    return row


# Kernel-name groups of --profile, first match wins (lower-case substrings).
PROFILE_GROUPS = (
    ("ours: fftconv", ("fftconv", "_k2_", "_step1", "_step3", "_short", "_conv_")),
    ("fft (cuFFT)", ("fft",)),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "matmul", "mm_")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("inductor fused", ("triton_",)),
)


def _profile(step, device: torch.device, top: int = 25) -> dict:
    """CUDA time of one more step by kernel (torch.profiler): the ``top`` kernels and totals per
    group of PROFILE_GROUPS, in ms. None off CUDA (no kernels to attribute)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return None
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    kernels = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = kernels.get(event.key, 0.0) + total / 1e3
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        low = name.lower()
        group = next((g for g, keys in PROFILE_GROUPS if any(k in low for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"total_ms": sum(kernels.values()), "groups_ms": groups, "top_ms": dict((k[:120], v) for k, v in ranked)}


@torch.no_grad()
def bench_infer(args, variant: str, seqlen: int, device: torch.device) -> dict:
    torch._dynamo.reset()
    batch = max(1, args.tokens // seqlen)
    model = _build(args, variant, seqlen, device).eval()
    runner = torch.compile(model) if args.compile else model
    ids = torch.randint(args.vocab_size, (batch, seqlen), device=device)

    def forward():
        with _autocast(device):
            runner(ids)

    with _variant_context(variant):
        first_s, times = _timed(forward, device, args.warmup, args.steps)
    ms = statistics.median(times)
    return {"kind": "infer", "variant": variant, "seqlen": seqlen, "batch": batch, "ms": ms,
            "tokens_per_s": batch * seqlen / ms * 1e3, "peak_mib": _peak_mib(device), "first_step_s": first_s,
            "times_ms": times}


@torch.no_grad()
def bench_generate(args, variant: str, device: torch.device) -> dict:
    """ms per generated token with ``LongConvLM.step`` (eager), states filled at random."""
    context = args.gen_context
    model = _build(args, variant, context + args.gen_tokens, device).eval()
    states = model.allocate_state(args.gen_batch, max_len=context + args.gen_tokens + args.warmup)
    filled = []
    for state in states:
        if hasattr(state, "length"):  # attention KV cache: `context` tokens already in it
            cache_dtype = torch.bfloat16 if device.type == "cuda" else state.keys.dtype  # autocast's
            keys, values = (torch.randn(t.shape, device=device, dtype=cache_dtype) for t in state[:2])
            filled.append(state._replace(keys=keys, values=values, length=context))
        else:  # H3: the state's size does not depend on the context
            filled.append(type(state)(*(torch.randn_like(t) for t in state)))
    token = torch.randint(args.vocab_size, (args.gen_batch,), device=device)
    current = {"states": filled}

    def one_token():
        with _autocast(device):
            logits, current["states"] = model.step(token, current["states"])
        return logits

    with _variant_context(variant):
        first_s, times = _timed(one_token, device, args.warmup, args.gen_tokens)
    ms = statistics.median(times)
    return {"kind": "generate", "variant": variant, "context": context, "batch": args.gen_batch, "ms": ms,
            "tokens_per_s": args.gen_batch / ms * 1e3, "peak_mib": _peak_mib(device), "first_step_s": first_s,
            "times_ms": times}


# ------------------------------------------------------------------------------- reporting --
def format_table(rows: list[dict]) -> str:
    header = f"{'kind':9} {'variant':13} {'L/ctx':>6} {'batch':>5} {'ms':>9} {'tokens/s':>11} {'peak MiB':>9} {'first s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kind']:9} {r['variant']:13} {r.get('seqlen', r.get('context', '')):>6} error: {r['error']}")
            continue
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        lines.append(
            f"{r['kind']:9} {r['variant']:13} {r.get('seqlen', r.get('context')):>6} {r['batch']:>5} "
            f"{r['ms']:>9.2f} {r['tokens_per_s']:>11.0f} {peak:>9} {r['first_step_s']:>8.1f}"
        )
    return "\n".join(lines)


def _guarded(rows: list[dict], label: dict, fn, device: torch.device) -> None:
    """Run one measurement; an out-of-memory is recorded as a row, not a crash of the table."""
    try:
        rows.append(fn())
    except torch.OutOfMemoryError as err:
        rows.append({**label, "error": f"out of memory ({str(err).splitlines()[0][:80]})"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    meta = run_metadata(device, argv=[__file__, *(sys.argv[1:] if argv is None else argv)])
    print(f"bench_models: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit'][:10]}",
          file=sys.stderr)
    rows: list[dict] = []
    for variant in args.variants:
        for seqlen in args.lengths:
            _guarded(rows, {"kind": "train", "variant": variant, "seqlen": seqlen},
                     lambda: bench_train(args, variant, seqlen, device), device)
        for seqlen in args.infer_lengths:
            _guarded(rows, {"kind": "infer", "variant": variant, "seqlen": seqlen},
                     lambda: bench_infer(args, variant, seqlen, device), device)
        if args.generate and variant in ("h3", "attention"):  # h3-torchfft steps like h3; a learned kernel has no step
            _guarded(rows, {"kind": "generate", "variant": variant, "context": args.gen_context},
                     lambda: bench_generate(args, variant, device), device)
    print(format_table(rows))
    result = {"meta": meta, "config": vars(args), "rows": rows}
    if args.out:
        write_results(args.out, {n: v for n, v in result.items() if n != "meta"}, meta, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
