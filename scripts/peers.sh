#!/usr/bin/env bash
# Peers for benchmarks/bench_fftconv.py (issue 22): FlashFFTConv and ThunderKittens' fftconv, built
# from their own sources next to ours, in the same run. None of their code is in this repo: the
# sources live in the ignored folder peers/ (carried to the device), the builds in the ignored
# folder peers-build/ (made on the device, kept there between calls because it is not carried).
#
#   scripts/peers.sh prepare   # here (no GPU needed): copy the sources out of the fetched mirrors
#                              # ($PEERS_MIRROR, default /work/.mirror; the search tool's `fetch`
#                              # of github:HazyResearch/flash-fft-conv and .../ThunderKittens)
#                              # into peers/src, plus the einops wheel FlashFFTConv imports: 5 MiB
#   scripts/peers.sh build     # on the device (nvcc >= 12.8 for TK, an sm_90 GPU for the bench):
#                              # build both into peers-build/, log to $OUT/peers_build.log if $OUT
#                              # is set; a peer that fails is reported and skipped, exit status 0
#   python benchmarks/bench_fftconv.py --tables ops --dtypes bf16 ...   # adds the peer rows by
#                              # itself when peers-build/ holds them (see its docstring)
#
# On the device tool: one call with carry ["peers"] (5 MiB) and the command `scripts/peers.sh build`,
# then a second (peers-build/ stays on the warm machine; carry ["peers"] again or nothing):
#   PYTHONPATH=$PWD python3 benchmarks/bench_fftconv.py --tables ops --dtypes bf16 \
#       --lengths 512 1024 2048 4096 8192 --out $OUT/bench_peers.json
# (or both joined with && in one call, if the build leaves the bench enough of its 600 s).
#
# What is built, with which flags:
#   FlashFFTConv: csrc/flashfftconv/setup.py (module monarch_cuda, 25 sources) with three edits to
#     a copy: cc_flag = ['--generate-code=arch=compute_90,code=sm_90'] (upstream: compute_80 PTX
#     only), arch = 'sm_90' (upstream asks torch.cuda for it; unused otherwise) and
#     -std=$FFC_STD (default c++20: the torch headers; upstream c++17). Its other nvcc flags stay:
#     -O3 -lineinfo --use_fast_math (upstream adds --threads 4 only for CUDA minor versions >= 2).
#     `setup.py build_ext` (ninja, MAX_JOBS) puts monarch_cuda*.so in peers-build/site, next to a
#     copy of the pure-Python package flashfftconv/ (and einops when the device has none).
#   ThunderKittens: kernels/fftconv/fftconv_pc.cu (the producer-consumer kernel, N = 1024 and 4096,
#     bf16) as a torch extension named tk_fftconv (torch.utils.cpp_extension.load, so torch's own
#     ABI/pybind flags), with kernels/common.mk's flags for GPU=H100 CONFIG=pytorch:
#     -DTORCH_COMPILE -DKITTENS_HOPPER -gencode=arch=compute_90a,code=sm_90a -std=c++20 -O3
#     --use_fast_math --expt-extended-lambda --expt-relaxed-constexpr -DNDEBUG -lineinfo
#     -Xcompiler=-Wno-psabi -Xcompiler=-fno-strict-aliasing -diag-suppress=3189
#     -I include -I prototype, linked with -lcuda (TMA descriptors via cuTensorMapEncodeTiled).
#     sm_90a (wgmma, setmaxnreg) runs on H100/H200 only; the kernel launches 132 persistent blocks.
# Checked on a CPU machine with the nvcc 13.0.88 wheels and torch 2.13's headers: all 25 FlashFFTConv
# objects and fftconv_pc.cu compile with these flags (warnings only: #3189 "module" in torch's
# headers under C++20, #2361 narrowing in fftconv_pc.cu); linking and running need the device.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS_DIR:-$ROOT/peers}
BUILD=${PEERS_BUILD:-$ROOT/peers-build}
MIRROR=${PEERS_MIRROR:-/work/.mirror}
PY=${PYTHON:-python3}
FFC_STD=${FFC_STD:-c++20}

prepare() {
    local ffc=$MIRROR/HazyResearch+flash-fft-conv/repo tk=$MIRROR/HazyResearch+ThunderKittens/repo
    for g in "$ffc" "$tk"; do
        [ -d "$g" ] || { echo "no mirror $g: fetch github:HazyResearch/{flash-fft-conv,ThunderKittens}" >&2; exit 1; }
    done
    rm -rf "$PEERS/src" && mkdir -p "$PEERS/src/flash-fft-conv" "$PEERS/src/ThunderKittens" "$PEERS/wheels" || exit 1
    git --git-dir="$ffc" archive HEAD LICENSE setup.py flashfftconv csrc/flashfftconv \
        | tar -x -C "$PEERS/src/flash-fft-conv" || exit 1
    git --git-dir="$tk" archive HEAD LICENSE include prototype kernels/common.mk kernels/fftconv \
        | tar -x -C "$PEERS/src/ThunderKittens" || exit 1
    { echo "flash-fft-conv $(git --git-dir="$ffc" rev-parse HEAD)"
      echo "ThunderKittens $(git --git-dir="$tk" rev-parse HEAD)"; } > "$PEERS/src/COMMITS"
    # FlashFFTConv's conv.py imports einops (unused there); the device has no network.
    ls "$PEERS"/wheels/einops-*.whl >/dev/null 2>&1 \
        || "$PY" -m pip download -q --no-deps -d "$PEERS/wheels" einops \
        || echo "warning: no einops wheel; the device needs einops installed for flashfftconv" >&2
    cat "$PEERS/src/COMMITS"
    du -sh "$PEERS"
}

build_ffc() {
    local src=$PEERS/src/flash-fft-conv work=$BUILD/ffc-src
    rm -rf "$work" && mkdir -p "$BUILD/site" && cp -r "$src/csrc/flashfftconv" "$work" || return 1
    "$PY" - "$work/setup.py" "$FFC_STD" <<'EOF' || return 1
import re, sys
path, std = sys.argv[1:]
text = open(path).read()
edits = [("arch = get_last_arch_torch()", "arch = 'sm_90'"),
         (re.search(r"cc_flag = \[[^\]]*\]", text).group(0),
          "cc_flag = ['--generate-code=arch=compute_90,code=sm_90']"),
         ("'-std=c++17'", f"'-std={std}'")]
for old, new in edits:
    assert old in text, f"setup.py changed upstream: no {old!r}"
    text = text.replace(old, new)
open(path, "w").write(text)
print("setup.py edited:", *(new for _, new in edits), sep="\n  ")
EOF
    (cd "$work" && MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext \
        --build-lib "$BUILD/site" --build-temp "$BUILD/ffc-tmp") || return 1
    rm -rf "$BUILD/site/flashfftconv" && cp -r "$src/flashfftconv" "$BUILD/site/" || return 1
    "$PY" -c "import einops" 2>/dev/null || [ -e "$BUILD/site/einops" ] \
        || "$PY" -m pip install -q --no-index --no-deps --target "$BUILD/site" "$PEERS"/wheels/einops-*.whl
}

build_tk() {
    local tk=$PEERS/src/ThunderKittens
    mkdir -p "$BUILD/tk"
    TK="$tk" TK_BUILD="$BUILD/tk" MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" - <<'EOF'
import os
from torch.utils.cpp_extension import load

tk = os.environ["TK"]
load(name="tk_fftconv", sources=[f"{tk}/kernels/fftconv/fftconv_pc.cu"],
     extra_include_paths=[f"{tk}/include", f"{tk}/prototype"],
     extra_cuda_cflags=["-DTORCH_COMPILE", "-DKITTENS_HOPPER", "-gencode=arch=compute_90a,code=sm_90a",
                        "-std=c++20", "-O3", "--use_fast_math", "--expt-extended-lambda", "--expt-relaxed-constexpr",
                        "-DNDEBUG", "-lineinfo", "-Xcompiler=-Wno-psabi", "-Xcompiler=-fno-strict-aliasing",
                        "-diag-suppress=3189"],
     extra_cflags=["-std=c++20"], extra_ldflags=["-lcuda"], build_directory=os.environ["TK_BUILD"], verbose=True)
print("tk_fftconv built in", os.environ["TK_BUILD"])
EOF
}

build() {
    local log=${OUT:+$OUT/peers_build.log}
    log=${log:-$BUILD/peers_build.log}
    mkdir -p "$BUILD" "$(dirname "$log")"
    if [ ! -d "$PEERS/src" ]; then
        echo "no $PEERS/src: run 'scripts/peers.sh prepare' on the CPU machine and carry peers" | tee "$log"
        return 0
    fi
    {
        echo "# $(date -u +%FT%TZ) $(cat "$PEERS/src/COMMITS" | tr '\n' ' ')"
        nvcc --version | tail -2; "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
        local start=$SECONDS status=() peers=(ffc tk) pids=() i
        for peer in "${peers[@]}"; do  # side by side: FlashFFTConv's 25 files use most of the cores
            "build_$peer" > "$BUILD/$peer.log" 2>&1 &
            pids+=($!)
        done
        for i in 0 1; do
            if wait "${pids[$i]}"; then status+=("${peers[$i]}: built (after $((SECONDS - start)) s)")
            else status+=("${peers[$i]}: FAILED (after $((SECONDS - start)) s), see above"); fi
            echo "## ${peers[$i]}"; cat "$BUILD/${peers[$i]}.log"
        done
        printf '# %s\n' "${status[@]}"
        PYTHONPATH="$BUILD/site" "$PY" -c "import flashfftconv; print('# import flashfftconv: ok')" 2>&1 | tail -1
    } 2>&1 | tee "$log" | grep -E "^#|error|Error|FAILED" | tail -40
    echo "# full log: $log"
    return 0
}

case "${1:-}" in
    prepare) prepare ;;
    build) build ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
