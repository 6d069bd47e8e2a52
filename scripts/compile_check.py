"""Compile the FlashConv and short-kernel kernels for Hopper (sm_90) without a GPU and report
their resources.

    python scripts/compile_check.py [--lengths 1024 4096 8192] [--batch 8] [--backward]
    python scripts/compile_check.py --short [--kernel-lens 1 4 16 64] [--dtypes bfloat16]
        [--directions bwd]   # kernels/shortconv.py, specialised as a launch at (8, 1024, 8192)
    python scripts/compile_check.py --family v6 --lengths 1024 2048 4096 [--all-options] [--backward]
    python scripts/compile_check.py --butterfly --lengths 32768 65536 [--learned] [--all-options]
        [--dtypes bfloat16] [--directions fwd]   # kernels/flashbutterfly.py

Catches compile errors (which Triton's interpreter does not) and prints registers per thread,
spilled bytes and shared memory per program for each kernel and plan, so launch choices can be
checked before spending device time. Uses the ptxas bundled with Triton.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # we want the real compiler

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lcconv_compile.kernels import blockfft_conv, shortconv  # noqa: E402

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


def compile_kernel(fn, pointer_types, constexprs, num_warps, want_asm=None, unit=(), divisible=(), source=ASTSource):
    constexprs, attrs = _launch_specialisation(fn, constexprs, unit, divisible)
    src = source(fn=fn, signature=_signature(fn, pointer_types, constexprs), constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": 1}
    compiled = triton.compile(src, target=HOPPER, options=options)
    ptx = compiled.asm["ptx"]
    report = dict(shared=compiled.metadata.shared, **_ptxas_report(ptx),
                  wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                  waits=ptx.count("wgmma.wait_group"),
                  scalar_global=len(re.findall(r"(?:ld|st)\.global(?:\.[a-z]+)*\.b(?:16|32)\b", ptx)),
                  vector_global=len(re.findall(r"(?:ld|st)\.global(?:\.[a-z]+)*\.v[248]", ptx)),
                  packed_lanes=packed_lane_leaks(ptx))
    if want_asm:
        report["asm"] = dict(compiled.asm)
    return report


def packed_lane_leaks(ptx: str) -> int:
    """How often the PTX takes a 32-bit half out of a 64-bit OR of shifted values: NVPTX's
    lowering of a <2 x i32> operation on one 64-bit register. Triton 3.6's LLVM produced
    ``shl nuw <2 x i32> <tid, x>, <31, 3>`` whose dead lane 0 overflowed into lane 1 (a tile
    load's column index): misaligned 16-byte loads on the H100 (short backward, Lk = 64, all
    options; benchmarks/NOTES.md). Any occurrence deserves a look at the LLVM IR; the short
    kernels' default configurations must have none."""
    defs = {}
    for line in ptx.splitlines():
        m = re.match(r"\s*([a-z][\w.]*)\s+(%rd\d+),", line)
        if m:
            defs[m.group(2)] = m.group(1)
    halves = re.findall(r"mov\.b64\s+\{[^}]*\},\s*(%rd\d+);", ptx)
    return sum(defs.get(rd, "").startswith("or.b64") for rd in halves)


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


_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}


def _captured_launch(direction: str, shape, kernel_len: int, dtype, gated_in: bool, on: bool, sms: int = 132):
    """(kernel, signature, constexprs, attrs, options) of the launch that the short launcher makes
    for these inputs, specialised as Triton would on the device (meta tensors: aligned pointers;
    integers equal to 1 become constants, multiples of 16 get tt.divisibility)."""
    batch, channels, seqlen = shape
    empty = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    args = dict(u=empty(batch, channels, seqlen), k=empty(channels, kernel_len, dt=torch.float32),
                D=empty(channels, dt=torch.float32),
                gate_in=empty(batch, channels, seqlen) if gated_in else None,
                gate_out=empty(batch, channels, seqlen) if on else None, gelu=on,
                dropout_mask=empty(batch, channels) if on else None)
    captured = {}

    def launch(kernel, grid, *call_args, **kw):
        captured.update(kernel=kernel, args=call_args, kw=kw)

    saved = shortconv.sm_count, shortconv._sms
    shortconv.sm_count = lambda device: sms
    shortconv._sms = lambda u: sms
    try:
        config = shortconv._config
        launch_config = shortconv._launch_config
        shortconv._launch_config = lambda u, kl, bw, tn, recompute=False: config(
            *u.shape, kl, u.dtype, sms, bw, tn, recompute)
        if direction == "fwd":
            shortconv.fftconv_fwd(**args, launch=launch, alloc=lambda s, dtype, device: empty(*s, dt=dtype))
        else:
            shortconv.fftconv_bwd(empty(batch, channels, seqlen), **args, launch=launch,
                                  alloc=lambda s, dtype, device: empty(*s, dt=dtype))
    finally:
        shortconv.sm_count, shortconv._sms = saved
        shortconv._launch_config = launch_config
    return _specialise(captured["kernel"], captured["args"], captured["kw"])


def _specialise(kernel, call_args, kw):
    """(kernel, signature, constexprs, attrs, options) of a captured launch ``kernel[grid](*call_args,
    **kw)``, specialised as Triton would on the device."""
    kw = dict(kw)
    options = {n: kw.pop(n) for n in ("num_warps", "num_stages") if n in kw}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = call_args[i] if i < len(call_args) else kw[name]
        if name in kw or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return kernel, signature, constexprs, attrs, options


def check_short(kernel_lens, batch, seqlen, channels=1024, dtypes=(torch.bfloat16, torch.float32),
                directions=("fwd", "bwd")):
    """Every fused-option combination of the short kernels' default configurations, bf16 and fp32,
    compiled as a launch at (batch, channels, seqlen) would be.

    Returns False if any kernel spills or shows the packed-lane pattern (packed_lane_leaks)."""
    clean = True
    for dtype in dtypes:
        for kernel_len in kernel_lens:
            for direction in directions:
                for on in (False, True):
                    for gated_in in ((False, True) if dtype == torch.bfloat16 else (on,)):
                        kernel, signature, constexprs, attrs, options = _captured_launch(
                            direction, (batch, channels, seqlen), kernel_len, dtype, gated_in, on)
                        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                        compiled = triton.compile(src, target=HOPPER, options=options)
                        ptx = compiled.asm["ptx"]
                        report = dict(shared=compiled.metadata.shared, **_ptxas_report(ptx),
                                      packed_lanes=packed_lane_leaks(ptx))
                        clean &= not report["spill_bytes"] and not report["packed_lanes"]
                        shape = {n: constexprs[n] for n in ("T", "BM", "W", "NC") if n in constexprs}
                        occupancy = ""
                        if direction == "fwd":
                            fits, key = _short_occupancy(report["regs"], report["shared"], options, dtype,
                                                         constexprs, gated_in, on)
                            listed = shortconv.FORWARD_PROGRAMS_PER_SM.get(key)
                            occupancy = f" programs/SM={fits} table={listed}" + ("" if listed == fits else " MISMATCH")
                        print(f"short {direction} {str(dtype)[6:]:8s} Lk={kernel_len:<4d} {shape} "
                              f"warps={options.get('num_warps')} gate_in={gated_in:d} options={on:d}: {report}"
                              f"{occupancy}", flush=True)
    return clean


def _short_occupancy(registers, shared, options, dtype, constexprs, gated_in, on):
    """(resident programs per SM, shortconv.FORWARD_PROGRAMS_PER_SM key) of a compiled forward."""
    fits = shortconv.resident_programs(registers, shared, options["num_warps"])
    key = shortconv.occupancy_key(dtype, constexprs["T"], constexprs["NC"], gated_in, on)
    return fits, key


# One kernel length per forward (T, NC) configuration: (16, 0), (16, 1), (32, 1), (32, 2), (32, 3), (32, 4).
OCCUPANCY_KERNEL_LENS = (1, 16, 32, 64, 96, 128)


def short_occupancy_table(batch, seqlen, channels=1024, dtypes=shortconv.INPUT_DTYPES):
    """shortconv.FORWARD_PROGRAMS_PER_SM as compiled for sm_90: every input dtype, forward (T, NC)
    configuration, gate_in and epilogue (gate_out, GELU and mask on together)."""
    table = {}
    for dtype in dtypes:
        for kernel_len in OCCUPANCY_KERNEL_LENS:
            for gated_in in (False, True):
                for on in (False, True):
                    kernel, signature, constexprs, attrs, options = _captured_launch(
                        "fwd", (batch, channels, seqlen), kernel_len, dtype, gated_in, on)
                    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                        attrs=attrs), target=HOPPER, options=options)
                    fits, key = _short_occupancy(_ptxas_report(compiled.asm["ptx"])["regs"], compiled.metadata.shared,
                                                 options, dtype, constexprs, gated_in, on)
                    table[key] = fits
    return table


def check_butterfly(lengths, dtypes, batch, channels, learned, directions=("fwd", "bwd"), on=True):
    """kernels/flashbutterfly.py and butterfly_steps.py: every kernel a call launches (K1 for k's rows, K1, K2, K3 and
    the backward's), captured from the launchers run on meta tensors at (batch, channels, L) with
    Lk = L, as the device would specialise them. ``learned``: lcconv::butterfly_conv's path
    (factors loaded), else the fftconv family (exact factors in registers)."""
    from lcconv_compile import reference
    from lcconv_compile.kernels import butterfly_factors, butterfly_rows_conv, butterfly_steps, flashbutterfly

    clean = True
    for dtype in dtypes:
        for seqlen in lengths:
            n1, n2 = flashbutterfly.split_for(seqlen, seqlen, dtype)
            if learned:
                n1, n2 = reference.butterfly_split(reference.fft_size(seqlen, seqlen))
            meta = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
            u, k = meta(batch, channels, seqlen), meta(channels, seqlen, dt=torch.float32)
            opts = dict(D=meta(channels, dt=torch.float32), gelu=on, dropout_mask=meta(batch, channels) if on else None)
            captured = []
            launchers = (butterfly_factors, butterfly_rows_conv, butterfly_steps)
            saved = [module.launch for module in launchers]
            for module in launchers:
                module.launch = lambda kernel, grid, *a, **kw: captured.append((kernel, grid, a, kw))
            try:
                for direction in directions:
                    if learned:
                        factors = (meta(n2, n1, n1, 2, dt=torch.float32), meta(n2, n1, n1, 2, dt=torch.float32))
                        if direction == "fwd":
                            flashbutterfly.butterfly_conv_fwd(u, k, *factors, **opts)
                        else:
                            flashbutterfly.butterfly_conv_bwd(meta(batch, channels, seqlen), u, k, *factors, **opts)
                    elif direction == "fwd":
                        flashbutterfly.fftconv_fwd(u, k, **opts)
                    else:
                        flashbutterfly.fftconv_bwd(meta(batch, channels, seqlen), u, k, **opts)
            finally:
                for module, launcher in zip(launchers, saved):
                    module.launch = launcher
            seen = set()
            for kernel, grid, call_args, kw in captured:
                # Meta tensors are not CUDA: what a device launch would pass instead.
                kw = dict(kw, FAST_TRIG=True)
                if kw.get("PRECISION") == "ieee":
                    kw["PRECISION"] = "tf32x3"
                kernel, signature, constexprs, attrs, options = _specialise(kernel, call_args, kw)
                key = (kernel.__name__, tuple(sorted((n, str(v)) for n, v in constexprs.items())))
                if key in seen:
                    continue
                seen.add(key)
                src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                try:
                    compiled = triton.compile(src, target=HOPPER, options=dict(options, num_stages=1))
                except Exception as err:  # report and go on: the table is the point
                    print(f"butterfly {str(dtype)[6:]:8s} L={seqlen} N1={n1} N2={n2} {kernel.__name__}: "
                          f"COMPILE ERROR {type(err).__name__}: {str(err)[:200]}", flush=True)
                    clean = False
                    continue
                ptx = compiled.asm["ptx"]
                report = dict(shared=compiled.metadata.shared, **_ptxas_report(ptx),
                              wgmma=ptx.count("wgmma.mma_async"))
                clean &= not report["spill_bytes"]
                shape = {n: constexprs[n] for n in ("N1", "N2", "BLOCK_C", "BLOCK_M", "BLOCK_N", "BLOCK_K", "M1",
                                                    "M2", "M3", "PRECISION", "EXACT", "GRAD") if n in constexprs}
                print(f"butterfly {str(dtype)[6:]:8s} L={seqlen} {kernel.__name__} grid={grid} {shape} "
                      f"warps={options.get('num_warps')}: {report}", flush=True)
    return clean


def check_v5(args):
    """FlashConv v5 (blockfft_conv.py): the forward (or --backward) kernel per length, default launch."""
    tuning = blockfft_conv.Tuning(num_warps=args.warps, pairs=args.pairs, chunk=args.chunk,
                               precision=args.precision, kernel_spectrum=args.kernel_spectrum, blocks=args.blocks)
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
        launch = blockfft_conv._launch(u, tuning, backward=args.backward)
        plan = launch.plan
        constexprs = dict(N1=plan.n1, N2=plan.n2, N3=plan.n3, CHUNK=plan.chunk, P=launch.pairs, BLOCKS=launch.blocks,
                          PRECISION=launch.precision, FAST_TRIG=True,
                          KSPEC_SCRATCH=launch.kernel_spectrum == "scratch", **options, **none_args)
        unit = ("su_l", "sk_l", "sgi_l", "sgo_l", "sm_h", "sdy_l")
        divisible = ("channels", "seqlen", "kernel_len", "su_b", "su_h", "sk_h", "sgi_b", "sgi_h",
                     "sgo_b", "sgo_h", "sm_b", "sdy_b", "sdy_h", "sdk_h")
        if args.backward:
            pointers.update(dy_ptr=ty, du_ptr=ty)
            grads = {} if on else dict(dgate_in_ptr=None, dgate_out_ptr=None)
            report = compile_kernel(blockfft_conv._fftconv_bwd_kernel, pointers, dict(constexprs, **grads),
                                    launch.num_warps, want_asm=args.asm, unit=unit, divisible=divisible)
        else:
            report = compile_kernel(blockfft_conv._fftconv_fwd_kernel, pointers, constexprs, launch.num_warps,
                                    want_asm=args.asm, unit=unit, divisible=divisible)
        asm = report.pop("asm", None)
        direction = "backward" if args.backward else "forward"
        print(f"v5 L={seqlen} plan={plan} blocks={launch.blocks} pairs={launch.pairs} warps={launch.num_warps} "
              f"precision={launch.precision} kernel_spectrum={launch.kernel_spectrum} "
              f"\n    {direction:9s} {report}")
        if asm is not None:
            path = f"{args.asm}/v5_{'bwd' if args.backward else 'fwd'}_L{seqlen}"
            for kind, text in asm.items():
                if isinstance(text, str):
                    with open(f"{path}.{kind}", "w") as f:
                        f.write(text)


def check_v6(args):
    """FlashConv v6 forward (monarch_conv.py, Gluon) per length: registers, spills, shared memory."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from lcconv_compile.kernels import monarch_conv, monarch_plan

    ty = "*bf16" if args.dtype == "bfloat16" else "*fp16"
    pointers = {"u_ptr": ty, "gin_ptr": ty, "gout_ptr": ty, "y_ptr": ty, "mask_ptr": ty, "k_ptr": "*fp32",
                "d_ptr": "*fp32", **{f"{w}_ptr": "*fp16" for w in ("f1r", "f1i", "f1n", "f2r", "f2i", "f2n")}}
    on = args.all_options
    ok = True
    for seqlen in args.lengths:
        plan = monarch_plan.plan_for(seqlen)
        if plan is None:
            print(f"v6 L={seqlen}: no plan")
            continue
        tuning = monarch_conv.forward_tuning(plan)
        tuning = dataclasses.replace(tuning, **{name: value for name, value in dict(
            warps=args.warps, k_half=args.k_half, f1_neg=args.f1_neg, both_chunks=args.both_chunks,
            probe=args.probe).items() if value is not None})
        constexprs = dict(HAS_D=True, HAS_GATE_IN=on, HAS_GATE_OUT=on, GELU=on, HAS_MASK=on, N=plan.n, N2=plan.n2,
                          BOTH_CHUNKS=monarch_conv.both_chunks(plan, seqlen % 16 == 0, tuning),
                          ASYNC_STAGING=seqlen % 16 == 0, K_HALF=tuning.k_half, F1_NEG=tuning.f1_neg, PROBE=tuning.probe,
                          **monarch_conv.kernel_config(plan, warps=tuning.warps))
        unit = ("su_l", "sk_l", "sgi_l", "sgo_l", "sy_l", "sm_h")
        # the launch at (B, H, L) contiguous: L and the strides specialised as multiples of 16 where they are
        divisible = ("su_b", "su_h", "sgi_b", "sgi_h", "sgo_b", "sgo_h", "sy_b", "sy_h", "sm_b", "sk_h")
        divisible = ("seqlen", "kernel_len") + divisible if seqlen % 16 == 0 else ()
        if args.backward:
            if not monarch_conv.backward_supported(seqlen):
                print(f"v6 L={seqlen}: no backward plan")
                continue
            constexprs = {n: v for n, v in constexprs.items()
                          if n not in ("BOTH_CHUNKS", "ASYNC_STAGING", "K_HALF", "F1_NEG", "PROBE")}
            constexprs.update(monarch_conv.kernel_config(plan, backward=True))
            bwd_pointers = dict(pointers, dy_ptr=ty, du_ptr=ty, dgin_ptr=ty, dgout_ptr=ty, dk_ptr="*fp32",
                                dd_ptr="*fp32")
            report = compile_kernel(monarch_conv._bwd_kernel, bwd_pointers, constexprs,
                                    monarch_conv.num_warps(plan, backward=True),
                                    want_asm=args.asm, unit=unit + ("sdy_l", "sdk_l"),
                                    divisible=divisible + (("sdy_b", "sdy_h", "sdk_h", "channels") if divisible else ()),
                                    source=GluonASTSource)
        else:
            report = compile_kernel(monarch_conv._fwd_kernel, pointers, constexprs, tuning.warps,
                                    want_asm=args.asm, unit=unit, divisible=divisible, source=GluonASTSource)
        asm = report.pop("asm", None)
        warps = monarch_conv.num_warps(plan, True) if args.backward else tuning.warps
        print(f"v6 L={seqlen} N={plan.n}=128x{plan.n2} warps={warps} "
              f"async_staging={seqlen % 16 == 0} {'' if args.backward else tuning} "
              f"plan shared={plan.shared_bytes() // 1024} KB\n    {'backward' if args.backward else 'forward':9s} {report}")
        ok &= (report["spill_bytes"] or 0) == 0 and report["shared"] <= monarch_conv.SHARED_LIMIT
        if asm is not None:
            for kind, text in asm.items():
                if isinstance(text, str):
                    with open(f"{args.asm}/v6_{'bwd' if args.backward else 'fwd'}_L{seqlen}.{kind}", "w") as f:
                        f.write(text)
    return ok


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warps", type=int)
    parser.add_argument("--k-half", action=argparse.BooleanOptionalAction, default=None,
                        help="v6: K's spectrum in float16 (default: the dispatched tuning's)")
    parser.add_argument("--f1-neg", action=argparse.BooleanOptionalAction, default=None,
                        help="v6: the -Im F1 constant tile (--no-f1-neg: a subtraction in registers)")
    parser.add_argument("--both-chunks", action=argparse.BooleanOptionalAction, default=None,
                        help="v6: both row chunks stage by stage (--no-both-chunks: one after the other)")
    parser.add_argument("--probe", type=int, help="v6: a measurement probe (monarch_conv.PROBES)")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--precision")
    parser.add_argument("--all-options", action="store_true", help="gates, GELU and mask on")
    parser.add_argument("--short", action="store_true", help="the short-kernel family (shortconv.py)")
    parser.add_argument("--kernel-lens", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--family", default="v5", choices=["v5", "v6"],
                        help="FlashConv v5 (blockfft_conv.py) or v6 (monarch_conv.py, Gluon, forward only)")
    parser.add_argument("--backward", action="store_true", help="v5: the backward kernel")
    parser.add_argument("--asm", help="v5: write the ttgir/ptx of each kernel into this folder")
    parser.add_argument("--channels", type=int, default=1024, help="v5: H of the launch (the benchmark's)")
    parser.add_argument("--kernel-spectrum", choices=list(blockfft_conv.KERNEL_SPECTRUM), help="v5: Tuning.kernel_spectrum")
    parser.add_argument("--blocks", type=int, choices=[1, 2], help="v5: Tuning.blocks")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="with --short")
    parser.add_argument("--directions", nargs="+", default=["fwd", "bwd"], help="with --short or --butterfly")
    parser.add_argument("--butterfly", action="store_true",
                        help="kernels/flashbutterfly.py at --lengths (Lk = L), --batch, --channels, --dtypes")
    parser.add_argument("--learned", action="store_true", help="with --butterfly: butterfly_conv's (loaded) factors")
    parser.add_argument("--occupancy-table", action="store_true",
                        help="with --short: print shortconv.FORWARD_PROGRAMS_PER_SM as compiled for sm_90")
    args = parser.parse_args()
    if args.butterfly:
        dtypes = tuple(getattr(torch, name) for name in args.dtypes)
        raise SystemExit(0 if check_butterfly(args.lengths, dtypes, args.batch, args.channels, args.learned,
                                              tuple(args.directions), args.all_options) else 1)
    if args.short and args.occupancy_table:
        table = short_occupancy_table(args.batch, max(args.lengths), args.channels)
        print("FORWARD_PROGRAMS_PER_SM = {")
        rows = list(table.items())
        for i in range(0, len(rows), 2):  # two entries per line, as shortconv.py holds them
            print("    " + " ".join(f"{key!r}: {fits}," for key, fits in rows[i:i + 2]))
        print("}")
        raise SystemExit(0)
    if args.short:
        dtypes = tuple(getattr(torch, name) for name in args.dtypes)
        raise SystemExit(0 if check_short(args.kernel_lens, args.batch, max(args.lengths), dtypes=dtypes,
                                          directions=tuple(args.directions)) else 1)
    if args.family == "v6":
        raise SystemExit(0 if check_v6(args) else 1)
    check_v5(args)

if __name__ == "__main__":
    main()
