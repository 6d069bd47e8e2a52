"""On the GPU machine, in one call: the CUDA-stage tests, where an eager call's host time goes,
the generated code of a compiled forward and training step, and (optionally) the host-overhead
benchmark table. Prints a compact summary; logs, code and JSON go under $OUT.

    OUT=out python3 scripts/check_compiled_kernels.py [--skip-tests] [--bench] [--budget 220]

Each part runs in its own process with a time limit, so a crash (AOTInductor, a segfault) or a
slow compile costs only that part. Parts run in order of importance until the budget is spent.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

HOST_BREAKDOWN = r'''
import math, sys, torch, lcconv_compile
from lcconv_compile.kernels import flashconv
from lcconv_compile import ops
sys.path.insert(0, "benchmarks")
from bench_fftconv import host_and_wall_us

def per_call_us(fn):
    return host_and_wall_us(fn, 300)[0]

B, H, L = 2, 4, 1024
u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
k = torch.randn(H, L, device="cuda") / math.sqrt(L)
D = torch.randn(H, device="cuda")
g = torch.randn_like(u)
params = flashconv._launch(u, flashconv.Tuning(), 4)
plan = params.plan
f1, f2, tw = flashconv._dft_tiles(plan, u.device)
spec, scales = flashconv.kernel_spectrum(k, plan, params.precision)
y = torch.empty_like(u)

def bare_fwd_launch():
    flashconv._fftconv_fwd_kernel[(params.groups, H)](
        u, spec, scales, D, None, None, None, y, f1, f2, tw, B, H, L, params.stacks_per_program,
        *u.stride(), 0, 0, 0, 0, 0, 0, 0, 0, HAS_D=True, HAS_GATE_IN=False, HAS_GATE_OUT=False,
        GELU=False, HAS_MASK=False, P=params.pairs, N1=plan.n1, N2=plan.n2, CHUNK=params.chunk,
        GAUSS=False, PRECISION=params.precision, num_warps=params.num_warps, num_stages=1)

ug, kg, Dg = (t.clone().requires_grad_() for t in (u, k, D))
rows = [
    ("op forward (eager, public API)", lambda: lcconv_compile.fftconv(u, k, D)),
    ("  op forward, gated", lambda: lcconv_compile.fftconv(u, k, D, gate_in=g, gate_out=g)),
    ("  forward impl (no dispatch, no checks)", lambda: ops.fftconv_forward_impl(u, k, D, None, None, False, None)),
    ("  launcher flashconv.fftconv_fwd", lambda: flashconv.fftconv_fwd(u, k, D)),
    ("  kernel_spectrum (1 launch + 2 empty)", lambda: flashconv.kernel_spectrum(k, plan, params.precision)),
    ("  bare forward-kernel launch", bare_fwd_launch),
    ("  torch.empty on cuda", lambda: torch.empty(B, H, L, device="cuda", dtype=torch.bfloat16)),
    ("op backward op (eager)", lambda: torch.ops.lcconv.fftconv_bwd(g, u, k, D, None, None, False, None)),
    ("  launcher flashconv.fftconv_bwd", lambda: flashconv.fftconv_bwd(g, u, k, D)),
    ("op forward+backward (autograd)", lambda: torch.autograd.grad(lcconv_compile.fftconv(ug, kg, Dg), (ug, kg, Dg), g)),
]
for name, fn in rows:
    print(f"host {name:<42} {per_call_us(fn):8.1f} us/call")

import cProfile, io, pstats
for name, fn in (rows[7], rows[9]):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(100):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    print(f"host cProfile of {name!r} (100 calls):")
    for line in text.getvalue().splitlines():
        if line.strip() and not line.lstrip().startswith(("Ordered", "List reduced")):
            print("host |", line[:150])
'''

CODE_DUMP = r'''
import math, os, torch, lcconv_compile
from torch._inductor.utils import run_and_get_code
out = os.environ["OUT"]
u = torch.randn(2, 4, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = (torch.randn(4, 1024, device="cuda") / 32).requires_grad_()
D = torch.randn(4, device="cuda", requires_grad=True)
g = torch.randn_like(u)

def step(u, k, D):
    y = lcconv_compile.fftconv(u, k, D, gate_out=g, gelu=True)
    return torch.autograd.grad(y, (u, k, D), g)

_, codes = run_and_get_code(torch.compile(step), u, k, D)
for i, code in enumerate(codes):
    open(os.path.join(out, f"generated_{i}.py"), "w").write(code)
    calls = [line.strip() for line in code.splitlines()
             if ".run(" in line or "extern_kernels" in line or "torch.ops." in line or "aten." in line]
    print(f"code {i}: {len(code)} chars; launches/calls:")
    for line in calls[:40]:
        print("   ", line[:160])
'''


def run_part(name: str, argv: list[str], limit: float, out: str) -> None:
    start = time.time()
    log = os.path.join(out, f"{name}.log")
    # Own process group: on timeout its compile workers die too (left alive, they skew later timings).
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=max(limit, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text = (proc.communicate()[0] or "") + "\n[timed out]"
        rc = "timeout"
    with open(log, "w") as f:
        f.write(text)
    print(f"== {name}: rc {rc}, {time.time() - start:.0f} s (log {log})")
    keep = [line for line in text.splitlines()
            if line.startswith(("host ", "code ", "    ", "PASSED", "FAILED", "ERROR", "SKIPPED", "E ", "=", "rc ",
                                "tests/"))
            or " passed" in line or " failed" in line or "Error" in line or "|" in line]
    print("\n".join(keep[-80:]))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=220.0, help="seconds for all parts together")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--bench", action="store_true", help="also the host-overhead benchmark table")
    parser.add_argument("--no-code", action="store_true", help="skip the generated-code dump")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the eager host-time breakdown")
    parser.add_argument("--test-share", type=float, default=0.6, help="fraction of the budget for the tests")
    parser.add_argument("--tests", default="tests/test_cuda_lowering.py tests/test_ops.py")
    args = parser.parse_args()
    out = os.environ.setdefault("OUT", "gpu_results")
    os.makedirs(out, exist_ok=True)
    site = ""
    wheels = [os.path.join(".whl", w) for w in sorted(os.listdir(".whl"))] if os.path.isdir(".whl") else []
    if wheels:  # what the GPU machine lacks (expecttest), as in scripts/gpu_check.sh
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        "/tmp/site", *wheels], check=False)
        site = os.pathsep + "/tmp/site"
    os.environ["PYTHONPATH"] = os.getcwd() + site + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONUNBUFFERED"] = "1"
    deadline = time.time() + args.budget
    py = sys.executable
    parts = []
    if not args.skip_tests:
        parts.append(("tests", [py, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "-m", "cuda",
                                "--durations=8", *args.tests.split()], args.test_share))
    if not args.no_breakdown:
        parts.append(("host_breakdown", [py, "-c", HOST_BREAKDOWN], 0.1))
    if not args.no_code:
        parts.append(("generated_code", [py, "-c", CODE_DUMP], 0.15))
    if args.bench:
        parts.append(("bench_host", [py, "benchmarks/bench_fftconv.py", "--tables", "host",
                                     "--out", os.path.join(out, "bench_host.json")], 0.5))
    import torch

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, argv, share in parts:
        left = deadline - time.time()
        if left < 10:
            print(f"== {name}: skipped, budget spent")
            continue
        run_part(name, argv, min(left, args.budget * share) if name != parts[-1][0] else left, out)


if __name__ == "__main__":
    main()
