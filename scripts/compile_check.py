"""Compile the FlashConv and short-kernel kernels for Hopper (sm_90) without a GPU and report
their resources.

    python scripts/compile_check.py [--lengths 1024 4096 8192] [--batch 8] [--family v5]
    python scripts/compile_check.py --short [--kernel-lens 1 4 16 64]   # kernels/shortconv.py

Catches compile errors (which Triton's interpreter does not) and prints registers per thread,
spilled bytes and shared memory per program for each kernel and plan, so launch choices can be
checked before spending device time. Uses the ptxas bundled with Triton.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # we want the real compiler

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lcconv_compile.kernels import flashconv, flashconv3, shortconv  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def _signature(fn, pointer_types: dict, constexprs: dict):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        elif name in ("sqrt_n",):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _launch_specialisation(fn, constexprs: dict, unit: tuple, divisible: tuple):
    """What a launch at power-of-two sizes tells the compiler: arguments equal to 1 become
    constants, pointers and the named integers are multiples of 16 (Triton specialises on both
    at launch; without them loads and stores compile unvectorised)."""
    constexprs = dict(constexprs, **{n: 1 for n in unit if n in fn.arg_names and n not in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constexprs and (n.endswith("_ptr") or n in divisible)}
    return constexprs, attrs


def compile_kernel(fn, pointer_types, constexprs, num_warps, want_asm=None, unit=(), divisible=(), maxnreg=None):
    constexprs, attrs = _launch_specialisation(fn, constexprs, unit, divisible)
    src = ASTSource(fn=fn, signature=_signature(fn, pointer_types, constexprs), constexprs=constexprs,
                    attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": 1}
    if maxnreg:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=HOPPER, options=options)
    ptx = compiled.asm["ptx"]
    report = dict(shared=compiled.metadata.shared, **_ptxas_report(ptx),
                  wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                  waits=ptx.count("wgmma.wait_group"),
                  scalar_global=len(re.findall(r"(?:ld|st)\.global(?:\.[a-z]+)*\.b(?:16|32)\b", ptx)),
                  vector_global=len(re.findall(r"(?:ld|st)\.global(?:\.[a-z]+)*\.v[248]", ptx)))
    if want_asm:
        report["asm"] = dict(compiled.asm)
    return report


def _ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes from ptxas -v on the kernel's PTX (Triton's bundled ptxas)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill_stores = re.search(r"(\d+) bytes spill stores", out)
    return dict(regs=int(regs.group(1)) if regs else None,
                spill_bytes=int(spill_stores.group(1)) if spill_stores else None)


def check_short(kernel_lens, batch, seqlen):
    """Every fused-option combination of the short kernels' default configurations, bf16 and fp32.

    Returns False if any kernel spills."""
    clean = True
    for dtype in (torch.bfloat16, torch.float32):
        ty = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        for kernel_len in kernel_lens:
            u = torch.empty(batch, 4, seqlen, dtype=dtype)
            for backward in (False, True):
                cfg = shortconv._launch_config(u, kernel_len, backward, shortconv.Tuning())
                for on in (False, True):
                    for gated_in in ((False, True) if dtype == torch.bfloat16 else (on,)):
                        options = dict(HAS_D=True, HAS_GATE_IN=gated_in, HAS_GATE_OUT=on, GELU=on, HAS_MASK=on)
                        constexprs = dict(options, T=cfg.block, BM=cfg.rows, NC=cfg.context_blocks,
                                          A_SPLIT=not (dtype == torch.bfloat16 and not gated_in),
                                          PRECISION=cfg.precision)
                        pointers = {"u_ptr": ty, "y_ptr": ty, "dy_ptr": ty, "du_ptr": ty, "k_ptr": "*fp32",
                                    "arrivals_ptr": "*i32"}
                        if not gated_in:
                            constexprs.update(gate_in_ptr=None, dgate_in_ptr=None)
                        if not on:
                            constexprs.update(gate_out_ptr=None, mask_ptr=None, dgate_out_ptr=None)
                        kernel = shortconv._shortconv_bwd_kernel if backward else shortconv._shortconv_fwd_kernel
                        if backward:
                            constexprs.update(LAGS=cfg.lags, SPLIT_CHANNEL=True)
                        # A launch on contiguous tensors: unit time strides (Triton passes 1 as a
                        # constant), everything else a multiple of 16 (L = 4096, Lk 16 or 64).
                        constexprs.update({n: 1 for n in kernel.arg_names if n.endswith("_l")})
                        constexprs = {n: v for n, v in constexprs.items() if n in kernel.arg_names}
                        divisible = [n for n in kernel.arg_names if n.endswith("_ptr") or n == "seqlen"
                                     or n.endswith(("_b", "_h")) and (n != "sk_h" or kernel_len % 16 == 0)]
                        report = compile_kernel(kernel, pointers, constexprs, cfg.num_warps, divisible=divisible)
                        clean &= not report["spill_bytes"]
                        print(f"short {'bwd' if backward else 'fwd'} {str(dtype)[6:]:8s} Lk={kernel_len:<4d} "
                              f"T={cfg.block} BM={cfg.rows} NC={cfg.context_blocks} warps={cfg.num_warps} "
                              f"gate_in={gated_in:d} options={on:d}: {report}")
    return clean


def check_v5(args):
    """FlashConv v5 (flashconv3.py): the forward (or --backward) kernel per length, default launch."""
    tuning = flashconv3.Tuning(num_warps=args.warps, pairs=args.pairs, chunk=args.chunk,
                               precision=args.precision, variant=args.variant,
                               kernel_spectrum=args.kernel_spectrum, persistent=args.persistent,
                               prefetch=args.prefetch, blocks=args.blocks, maxnreg=args.maxnreg)
    on = args.all_options
    options = dict(HAS_D=True, HAS_GATE_IN=on, HAS_GATE_OUT=on, GELU=on, HAS_MASK=on)
    none_args = {} if on else dict(gate_in_ptr=None, gate_out_ptr=None, mask_ptr=None)
    ty = "*bf16" if args.dtype == "bfloat16" else "*fp32"
    operand_ty = "*fp32" if args.dtype == "float32" else "*fp16"
    pointers = {"u_ptr": ty, "y_ptr": ty, "kspec_ptr": operand_ty,
                **{f"{w}_ptr": operand_ty for w in ("w1", "w1i", "w2", "w2i", "w3", "w3i")}}
    for seqlen in args.lengths:
        # The benchmark's shape (a meta tensor: _launch reads only its shape and dtype).
        u = torch.empty(args.batch, args.channels, seqlen, dtype=getattr(torch, args.dtype), device="meta")
        launch = flashconv3._launch(u, tuning, backward=args.backward)
        plan = launch.plan
        constexprs = dict(N1=plan.n1, N2=plan.n2, N3=plan.n3, CHUNK=plan.chunk, P=launch.pairs, BLOCKS=launch.blocks,
                          PRECISION=launch.precision, VARIANT=tuning.variant, FAST_TRIG=True,
                          KSPEC_SCRATCH=launch.kernel_spectrum == "scratch", PREFETCH=launch.prefetch,
                          ONE_ITEM=launch.programs == args.channels * launch.groups, **options, **none_args)
        unit = ("su_l", "sk_l", "sgi_l", "sgo_l", "sm_h", "sdy_l")
        divisible = ("channels", "seqlen", "kernel_len", "su_b", "su_h", "sk_h", "sgi_b", "sgi_h",
                     "sgo_b", "sgo_h", "sm_b", "sdy_b", "sdy_h", "sdk_h")
        if args.backward:
            pointers.update(dy_ptr=ty, du_ptr=ty)
            grads = {} if on else dict(dgate_in_ptr=None, dgate_out_ptr=None)
            constexprs = {n: v for n, v in constexprs.items() if n not in ("VARIANT", "PREFETCH", "ONE_ITEM")}
            report = compile_kernel(flashconv3._fftconv_bwd_kernel, pointers, dict(constexprs, **grads),
                                    launch.num_warps, want_asm=args.asm, unit=unit, divisible=divisible,
                                    maxnreg=launch.maxnreg)
        else:
            report = compile_kernel(flashconv3._fftconv_fwd_kernel, pointers, constexprs, launch.num_warps,
                                    want_asm=args.asm, unit=unit, divisible=divisible, maxnreg=launch.maxnreg)
        asm = report.pop("asm", None)
        direction = "backward" if args.backward else "forward"
        print(f"v5 L={seqlen} plan={plan} blocks={launch.blocks} pairs={launch.pairs} warps={launch.num_warps} "
              f"precision={launch.precision} kernel_spectrum={launch.kernel_spectrum} "
              f"prefetch={launch.prefetch and not args.backward} maxnreg={launch.maxnreg}\n    {direction:9s} {report}")
        if asm is not None:
            path = f"{args.asm}/v5_{'bwd' if args.backward else 'fwd'}_L{seqlen}"
            for kind, text in asm.items():
                if isinstance(text, str):
                    with open(f"{path}.{kind}", "w") as f:
                        f.write(text)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warps", type=int)
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--precision")
    parser.add_argument("--gauss", action="store_true")
    parser.add_argument("--all-options", action="store_true", help="gates, GELU and mask on")
    parser.add_argument("--kernels", nargs="+", default=["spectrum", "forward", "backward"])
    parser.add_argument("--short", action="store_true", help="the short-kernel family (shortconv.py)")
    parser.add_argument("--kernel-lens", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--family", default="v3", choices=["v3", "v5"])
    parser.add_argument("--backward", action="store_true", help="v5: the backward kernel")
    parser.add_argument("--variant", default="full", choices=list(flashconv3.VARIANTS))
    parser.add_argument("--asm", help="v5: write the ttgir/ptx of each kernel into this folder")
    parser.add_argument("--channels", type=int, default=1024, help="v5: H of the launch (the benchmark's)")
    parser.add_argument("--kernel-spectrum", choices=list(flashconv3.KERNEL_SPECTRUM), help="v5: Tuning.kernel_spectrum")
    parser.add_argument("--persistent", action=argparse.BooleanOptionalAction, help="v5: Tuning.persistent")
    parser.add_argument("--prefetch", action=argparse.BooleanOptionalAction, help="v5: Tuning.prefetch")
    parser.add_argument("--blocks", type=int, choices=[1, 2], help="v5: Tuning.blocks")
    parser.add_argument("--maxnreg", type=int, help="v5: Tuning.maxnreg (registers per thread cap)")
    args = parser.parse_args()
    if args.short:
        raise SystemExit(0 if check_short(args.kernel_lens, args.batch, max(args.lengths)) else 1)
    if args.family == "v5":
        return check_v5(args)
    tuning = flashconv.Tuning(num_warps=args.warps, pairs=args.pairs, chunk=args.chunk, precision=args.precision,
                              gauss=args.gauss)
    for seqlen in args.lengths:
        u = torch.empty(args.batch, 4, seqlen, dtype=getattr(torch, args.dtype))
        launch = flashconv._launch(u, tuning, default_per_sm=4)
        plan = launch.plan
        shape = dict(N1=plan.n1, N2=plan.n2, CHUNK=launch.chunk, PRECISION=launch.precision, GAUSS=launch.gauss)
        on = args.all_options
        options = dict(HAS_D=True, HAS_GATE_IN=on, HAS_GATE_OUT=on, GELU=on, HAS_MASK=on)
        none_args = {} if on else dict(gate_in_ptr=None, gate_out_ptr=None, mask_ptr=None)
        ty = "*bf16" if args.dtype == "bfloat16" else "*fp32"
        bf16 = {"u_ptr": ty, "y_ptr": ty, "dy_ptr": ty, "du_ptr": ty}
        builds = {
            "spectrum": lambda: compile_kernel(flashconv._spectrum_kernel, {}, dict(shape, CHUNK=plan.chunk),
                                               4 if plan.fft_size <= 4096 else 8),
            "forward": lambda: compile_kernel(flashconv._fftconv_fwd_kernel, bf16,
                                              dict(shape, P=launch.pairs, **options, **none_args), launch.num_warps),
            "backward": lambda: compile_kernel(flashconv._fftconv_bwd_kernel, bf16,
                                               dict(shape, P=launch.pairs, **options, **none_args,
                                                    **({} if on else dict(dgate_in_ptr=None, dgate_out_ptr=None))),
                                               launch.num_warps),
        }
        reports = {name: builds[name]() for name in args.kernels}
        print(f"L={seqlen} plan={plan} pairs={launch.pairs} chunk={launch.chunk} warps={launch.num_warps}")
        for name, report in reports.items():
            print(f"    {name:9s} {report}")


if __name__ == "__main__":
    main()
