"""The synthetic table (issue 14 item 5): induction head and associative recall for H3,
H3-LongConv and attention at the H3 paper's length and at longer ones, on one GPU.

    python benchmarks/synthetic_table.py --out-dir benchmarks/results/synthetic \
        [--lengths 32 1024 8192] [--mixers h3 h3-longconv attention] [--tasks induction recall]

Every (length, mixer, task) is one ``python -m lcconv_compile.models.train_synthetic ... --compile
--json`` process; up to ``--parallel`` run at once (small models leave the GPU mostly idle, so
they share it; their tokens/s are therefore not speed numbers). Settings (vocabulary 20,
2 layers, batch 64, lr 3e-3 with cosine decay; NOTES.md has how they were chosen on CPU):

* L <= 64 (the paper's length): train_synthetic's defaults (d_model 64, head_dim 16, S4D-Real),
  ``--short-steps`` steps.
* longer L: the same defaults, except H3 on induction head: d_model 32, head_dim 1, C scale 10
  and the SSM's dynamics at ``--ssm-lr`` 1e-2 (at the global rate it stays at chance at L = 1K);
  ``--long-steps`` steps.

Prints the answer-accuracy table (the number the paper reports) and writes it, with each run's
command, to ``--out-dir/table.json``; each run's own JSON (history included) lies beside it.
Reports, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from lcconv_compile.provenance import write_results


def run_args(mixer: str, task: str, seqlen: int, args) -> list[str]:
    short = seqlen <= 64
    cmd = ["--mixer", mixer, "--task", task, "--seq-len", str(seqlen),
           "--steps", str(args.short_steps if short else args.long_steps), "--compile", "--device", args.device]
    if not short and mixer == "h3" and task == "induction":
        cmd += ["--d-model", "32", "--head-dim", "1", "--ssm-c-scale", "10", "--ssm-lr", str(args.ssm_lr)]
    return cmd


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[32, 1024, 8192])
    p.add_argument("--mixers", nargs="+", default=["h3", "h3-longconv", "attention"])
    p.add_argument("--tasks", nargs="+", default=["induction", "recall"])
    p.add_argument("--short-steps", type=int, default=800)
    p.add_argument("--long-steps", type=int, default=3000)
    p.add_argument("--ssm-lr", type=float, default=1e-2)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed (model and data)")
    p.add_argument("--parallel", type=int, default=18)
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default: none)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)

    jobs = [(seqlen, mixer, task, seed) for seqlen in args.lengths for mixer in args.mixers for task in args.tasks
            for seed in args.seeds]
    pending, running, results = list(jobs), {}, {}
    start = time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            seqlen, mixer, task, seed = job = pending.pop(0)
            name = f"{task}_{mixer}_L{seqlen}" + (f"_seed{seed}" if seed else "")
            out = os.path.join(args.out_dir, name + ".json")
            cmd = [sys.executable, "-m", "lcconv_compile.models.train_synthetic", *run_args(mixer, task, seqlen, args),
                   "--seed", str(seed), "--json", out]
            log = open(os.path.join(args.out_dir, name + ".log"), "w")
            running[job] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), cmd, out, time.time(), log)
        for job, (proc, cmd, out, began, log) in list(running.items()):
            timed_out = args.timeout is not None and time.time() - began > args.timeout
            if proc.poll() is None and not timed_out:
                continue
            if timed_out and proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            row = {"command": " ".join(["python"] + cmd[1:]), "returncode": proc.returncode}
            if proc.returncode == 0 and os.path.exists(out):
                with open(out) as f:
                    saved = json.load(f)
                row["answer_accuracy"] = saved.get("answer_accuracy")
                row["json"] = os.path.basename(out)
            results[job] = row
            del running[job]
        time.sleep(1.0)

    table = [{"seq_len": s, "mixer": m, "task": t, "seed": seed, **results[(s, m, t, seed)]} for s, m, t, seed in jobs]
    print(f"{'L':>6} {'mixer':12} {'induction':>16} {'recall':>16}   (answer accuracy %, one per seed)")
    for seqlen in args.lengths:
        for mixer in args.mixers:
            cells = []
            for task in ("induction", "recall"):
                accs = [r.get("answer_accuracy") for r in table
                        if (r["seq_len"], r["mixer"], r["task"]) == (seqlen, mixer, task)]
                cells.append(" / ".join(f"{100 * a:.1f}" if a is not None else "-" for a in accs) or "")
            print(f"{seqlen:>6} {mixer:12} {cells[0]:>16} {cells[1]:>16}")
    summary = {"wall_s": time.time() - start, "runs": table}
    write_results(os.path.join(args.out_dir, "table.json"), summary, indent=2)
    return summary


if __name__ == "__main__":
    main()
