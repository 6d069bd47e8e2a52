"""Draw the LM training-step table of ``bench_models.py`` results (one JSON per length, or one
JSON with every length) as the README's plot: ms per step and tokens/s vs L for each variant.
Refuses JSON files from different commits or devices. Runs anywhere (needs matplotlib).

    python benchmarks/plot_models.py benchmarks/results/<date>_h100_bench_models_L*_<commit>.json \
        --out docs/models_h100.png
"""

from __future__ import annotations

import argparse
import json

STYLES = {"h3": ("H3 (ours)", "o-"), "h3-torchfft": ("H3, torch.fft + Inductor alone", "s--"),
          "attention": ("SDPA attention", "^-.")}


def load_rows(paths: list[str]) -> tuple[dict, list[dict]]:
    environments, rows = [], []
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        environments.append(result["meta"])
        rows += [r for r in result["rows"] if r.get("kind") == "train" and "ms" in r]
    keys = {(e["device"], e["commit"], e["torch"]) for e in environments}
    if len(keys) != 1:
        raise SystemExit(f"the files come from different devices, commits or torch versions: {sorted(keys)}")
    return environments[0], rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+", help="bench_models.py JSON files (same commit and device)")
    parser.add_argument("--out", default="models.png")
    args = parser.parse_args()
    env, rows = load_rows(args.results)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, (label, style) in STYLES.items():
        points = sorted((r["seqlen"], r["ms"], r["tokens_per_s"]) for r in rows if r["variant"] == variant)
        if not points:
            continue
        lengths = [p[0] for p in points]
        axes[0].plot(lengths, [p[1] for p in points], style, label=label)
        axes[1].plot(lengths, [p[2] / 1e6 for p in points], style, label=label)
    for ax, ylabel in zip(axes, ("ms per training step", "training tokens/s (millions)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (32K tokens per step)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"2-layer LM, d_model 768, bf16, compiled: {env['device']}, torch {env['torch']}, "
                 f"commit {env['commit'][:7]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
