"""Where an AOTInductor package that holds our kernels crashes (GPU machine; a diagnosis, not a test).

Each case is exported, packaged (``torch._inductor.aoti_compile_and_package``) and then loaded and
run in a fresh Python process that never imports lcconv_compile, with faulthandler on (and under
gdb when the machine has it, for the C++ frames). Cases go from no kernel of ours to the layers of
tests/test_cuda_lowering.py, so the first one that fails says which ingredient breaks:

    python scripts/diagnose_aoti.py --out DIR [--cases linear user_kernel conv_fp32 ...]

Writes DIR/aoti_<case>.log (the child's stdout/stderr and gdb's backtrace), DIR/aoti_<case>.cpp
(the generated wrapper source found in the package) and prints one line per case.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import torch
import triton
import triton.language as tl

_CHILD = textwrap.dedent("""
    import faulthandler, sys, torch
    faulthandler.enable()
    package, inputs, output, prelude = sys.argv[1:]
    if "cuda" in prelude:
        torch.zeros(1, device="cuda")  # a CUDA context before the loader runs
    if "inductor" in prelude:
        import torch._inductor.codecache  # noqa: F401
    model = torch._inductor.aoti_load_package(package)
    print("loaded", flush=True)
    args = [t.cuda() for t in torch.load(inputs)]
    out = model(*args)
    torch.cuda.synchronize()
    print("ran", flush=True)
    torch.save(out.cpu() if isinstance(out, torch.Tensor) else [o.cpu() for o in out], output)
    assert "lcconv_compile" not in sys.modules
""")


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * factor, mask=i < n)


@torch.library.triton_op("lcconv_diag::scale", mutates_args=())
def _scale(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    torch.library.wrap_triton(_scale_kernel)[(triton.cdiv(n, 128),)](x, y, n, 2.5, BLOCK=128)
    return y


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _cases():
    from lcconv_compile import fftconv
    from lcconv_compile.models import H3, LongConv

    def conv(B, H, L, Lk, dtype, **options):
        def make():
            u = torch.randn(B, H, L, device="cuda", dtype=dtype)
            k = torch.randn(H, Lk, device="cuda") / Lk ** 0.5
            D = torch.randn(H, device="cuda")
            return _Fn(lambda u, k, D: fftconv(u, k, D, **options)), (u, k, D)
        return make

    def layer(cls):
        def make():
            torch.manual_seed(0)
            return (cls(64, 512).cuda().eval()), (torch.randn(2, 512, 64, device="cuda"),)
        return make

    return {
        "linear": lambda: (torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).cuda(),
                           (torch.randn(8, 64, device="cuda"),)),
        "user_kernel": lambda: (_Fn(lambda x: torch.ops.lcconv_diag.scale(x) + 1),
                                (torch.randn(1000, device="cuda"),)),
        "conv_fp32": conv(2, 64, 512, 512, torch.float32),
        "conv_bf16": conv(2, 64, 512, 512, torch.bfloat16),
        "conv_short": conv(2, 64, 300, 7, torch.float32),
        "conv_fallback": conv(1, 2, 20000, 300, torch.float32),
        "conv_options": conv(2, 64, 512, 512, torch.bfloat16, gelu=True),
        "LongConv": layer(LongConv),
        "H3": layer(H3),
    }


def _wrapper_source(package: str, dest: str) -> None:
    with zipfile.ZipFile(package) as z:
        names = z.namelist()
        sources = [n for n in names if n.endswith((".cpp", ".wrapper.cpp"))]
        with open(dest, "w") as f:
            f.write("# files: " + " ".join(names) + "\n")
            for n in sources:
                f.write(f"\n// ===== {n}\n")
                f.write(z.read(n).decode(errors="replace"))


def run_case(name, make, out_dir, prelude="none") -> str:
    work = os.path.join(out_dir, f"work_{name}")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(out_dir, f"aoti_{name}.log")
    try:
        model, args = make()
        with torch.no_grad():
            want = model(*args)
        exported = torch.export.export(model, args)
        package = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(work, "p.pt2"))
        _wrapper_source(package, os.path.join(out_dir, f"aoti_{name}.cpp"))
        torch.save([a.cpu() for a in args], os.path.join(work, "x.pt"))
    except Exception as exc:  # noqa: BLE001 - a diagnosis reports every failure and goes on
        with open(log, "w") as f:
            f.write(repr(exc))
        return f"{name}: build failed: {type(exc).__name__}: {str(exc)[:200]}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child = [sys.executable, "-c", _CHILD, package, os.path.join(work, "x.pt"), os.path.join(work, "y.pt"), prelude]
    result = subprocess.run(child, capture_output=True, text=True, env=env, timeout=300)
    text = f"rc {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}\n"
    verdict = f"{name} (child prelude {prelude}): rc {result.returncode}"
    if result.returncode == 0:
        got = torch.load(os.path.join(work, "y.pt"))
        err = ((got.double() - want.cpu().double()).norm() / want.cpu().double().norm()).item()
        verdict += f", rel err {err:.1e}"
    elif shutil.which("gdb"):
        gdb = ["gdb", "-batch", "-ex", "run", "-ex", "bt 40", "--args"] + child
        traced = subprocess.run(gdb, capture_output=True, text=True, env=env, timeout=300)
        text += f"--- gdb\n{traced.stdout[-12000:]}\n{traced.stderr[-3000:]}\n"
        frames = [ln for ln in traced.stdout.splitlines() if ln.startswith("#")][:6]
        verdict += "\n    " + "\n    ".join(f[:160] for f in frames)
    else:
        verdict += " (no gdb) " + " | ".join(result.stderr.strip().splitlines()[-4:])[:400]
    with open(log, "w") as f:
        f.write(text)
    return verdict


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="aoti_diagnosis")
    parser.add_argument("--cases", nargs="+")
    parser.add_argument("--preludes", nargs="+", default=["none"],
                        help="what the child does before loading: none, cuda, inductor, cuda+inductor, same "
                             "(same: load in this process instead of a child)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = _cases()
    for name in args.cases or list(cases):
        for prelude in args.preludes:
            if prelude == "same":
                print(load_here(name, cases[name], args.out), flush=True)
            else:
                print(run_case(name, cases[name], args.out, prelude), flush=True)


def load_here(name, make, out_dir) -> str:
    """Package and load in this process (which has a CUDA context and Inductor loaded)."""
    model, args = make()
    with torch.no_grad():
        want = model(*args)
    exported = torch.export.export(model, args)
    os.makedirs(os.path.join(out_dir, f"work_{name}"), exist_ok=True)
    package = torch._inductor.aoti_compile_and_package(
        exported, package_path=os.path.join(out_dir, f"work_{name}", "same.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    got = loaded(*args)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    return f"{name} (loaded in the packaging process): rel err {err:.1e}"


if __name__ == "__main__":
    main()
