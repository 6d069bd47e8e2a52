"""Draw the lengths table of one ``bench_fftconv.py --tables lengths`` run (a results JSON) as the
README's plot: time vs L (1K..4M, log-log) of ours, torch.fft and the memory floor, forward and
forward+backward, at a constant B*H*L. Runs anywhere (needs matplotlib; reads JSON only).

    python benchmarks/plot_lengths.py benchmarks/results/<run>.json --out docs/lengths.png
"""

from __future__ import annotations

import argparse
import json

SHORT_NAMES = {"blockfft_conv": "v5", "flashconv3": "v5", "flashbutterfly": "fb", "shortconv": "short", "reference": "ref"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", help="a bench_fftconv.py JSON with length_rows")
    parser.add_argument("--out", default="lengths.png")
    args = parser.parse_args()
    with open(args.results) as f:
        result = json.load(f)
    rows = result.get("length_rows")
    if not rows:
        raise SystemExit(f"{args.results} has no length_rows: run bench_fftconv.py --tables lengths")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["pass_"] == pass_]
        lengths = [r["L"] for r in sel]
        for key, label, style in (("ours_ms", "lcconv (as dispatched)", "o-"), ("torch_fft_ms", "torch.fft", "s--"),
                                  ("floor_ms", "memory floor", ":")):
            pts = [(L, r[key]) for L, r in zip(lengths, sel) if r.get(key)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for L, r in zip(lengths, sel):  # which kernels ran each point
            if r.get("ours_ms"):
                ax.annotate(SHORT_NAMES.get(r["family"], r["family"]), (L, r["ours_ms"]), textcoords="offset points", xytext=(0, 6),
                            fontsize=6, ha="center")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (B*H*L = %d)" % (sel[0]["B"] * sel[0]["H"] * sel[0]["L"]))
        ax.set_title(f"{pass_}, {sel[0]['dtype']}, Lk = L")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[0].legend(fontsize=8, title="v5 = FlashConv, fb = FlashButterfly, ref = torch.fft in the op",
                   title_fontsize=7)
    meta = result["meta"]
    fig.suptitle(f"{meta['device']}, commit {meta['commit'][:7]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
