"""Issue 8 study (a): which objective gives the best rank-accuracy curve on the arithmetic task, on CPU.

Each method is trained at every learning rate of a small sweep and every seed through `compare`, evaluated by
greedy generation exact match at ranks 1, 2, 4, 8; each method is then reported at its own best learning rate
by mean AURAC (the paper's protocol). Finished runs are reused, so the script can be stopped and rerun.

    python benchmarks/study_objectives.py --output_dir runs/study            # the sweep (about 1 hour, 2 cores)
    python benchmarks/study_objectives.py --output_dir runs/study --equal_compute   # + single-function methods
                                                                                 # with as many steps of work
"""
import argparse
import json
import os
import platform
import time

from matryoshka_lora.compare import SVD, compare, markdown

METHODS = ["matryoshka", "matryoshka-exact", "sandwich", "dylora", "lora", "lora-svd"]
TRAIN = {
    "model": "smollm2", "data": "arithmetic", "max_examples": 800, "max_length": 160,
    "rank": 8, "train_ranks": [1, 2, 4, 8], "scaling": "none", "batch_size": 4, "max_steps": 50,
    "warmup_steps": 5, "logging_steps": 10, "save_steps": 0, "sandwich_n": 1,
}
EVAL = {"task": "arithmetic", "limit": 48, "batch_size": 48, "max_new_tokens": 48}
# Work per step relative to one forward/backward: |S| = 4 ranks for matryoshka-exact, 3 for sandwich (n = 1).
WORK = {"matryoshka-exact": 4, "sandwich": 3}


def best_by_aurac(sweeps: dict) -> dict:
    """{method: (lr, entry)} with the highest mean AURAC over seeds."""
    best = {}
    for lr, summary in sweeps.items():
        for m, e in summary["methods"].items():
            if m not in best or e["aurac"] > best[m][1]["aurac"]:
                best[m] = (lr, e)
    return best


def report(sweeps: dict, seeds: list[int], extra: dict | None = None) -> str:
    best = best_by_aurac(sweeps)
    first = next(iter(sweeps.values()))
    ranks = first["ranks"]
    lines = [f"arithmetic, {first['metric']} (%), mean over seeds {seeds}, each method at its best learning rate "
             f"of {sorted(sweeps)} by mean AURAC; pretrained: {100 * first['pretrained']:.1f}", "",
             "| method | lr | steps | " + " | ".join(f"r={k}" for k in ranks) + " | AURAC | log-AURAC |",
             "|" + "---|" * (len(ranks) + 5)]
    rows = [(m, lr, TRAIN["max_steps"], e) for m, (lr, e) in best.items()]
    rows += [(m + " (equal compute)", lr, steps, e) for m, (lr, steps, e) in (extra or {}).items()]
    for m, lr, steps, e in sorted(rows, key=lambda r: -r[3]["aurac"]):
        cells = [f"{100 * v:.1f}" for v in e["per_rank"]]
        lines.append(f"| {m} | {lr:g} | {steps} | " + " | ".join(cells) +
                     f" | {100 * e['aurac']:.1f} | {100 * e.get('log_aurac', float('nan')):.1f} |")
    lines += ["", "All learning rates:", ""]
    for lr, summary in sorted(sweeps.items()):
        lines += [f"learning rate {lr:g}:", "", markdown(summary)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/study")
    p.add_argument("--lrs", default="5e-4,2e-3")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--equal_compute", action="store_true",
                   help="also train matryoshka, dylora and lora at their best lr for 4x the steps")
    p.add_argument("--equal_compute_seeds", help="seeds of the equal-compute runs (default: --seeds)")
    args = p.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    started = time.perf_counter()
    sweeps = {lr: compare(None, methods, seeds, os.path.join(args.output_dir, f"lr-{lr:g}"),
                          dict(TRAIN, learning_rate=lr), EVAL) for lr in lrs}
    extra = {}
    if args.equal_compute:
        best = best_by_aurac(sweeps)
        steps = TRAIN["max_steps"] * max(WORK.values())
        ec_seeds = [int(x) for x in args.equal_compute_seeds.split(",")] if args.equal_compute_seeds else seeds
        for m in ("matryoshka", "dylora", "lora"):
            lr = best[m][0]
            group = [m, SVD] if m == "lora" else [m]  # lora-svd re-factors the same lora run
            s = compare(None, group, ec_seeds, os.path.join(args.output_dir, f"equal-{m}-lr-{lr:g}"),
                        dict(TRAIN, learning_rate=lr, max_steps=steps), EVAL)
            extra.update({g: (lr, steps, s["methods"][g]) for g in group})
    text = report(sweeps, seeds, extra)
    if extra:
        text += f"\nequal-compute rows: {TRAIN['max_steps'] * max(WORK.values())} steps, mean over seeds {ec_seeds}\n"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    text += f"\nmeasured on {machine} in {(time.perf_counter() - started) / 60:.0f} min\n"
    with open(os.path.join(args.output_dir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump({str(lr): s for lr, s in sweeps.items()}, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
