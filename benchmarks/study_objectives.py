r"""Issue 8 study (a): which objective gives the best rank-accuracy curve on the arithmetic task, on CPU.

Each method is trained at every learning rate of a small sweep and every seed through `compare`, evaluated by
greedy generation exact match at ranks 1, 2, 4, 8; each method is then reported at its own best learning rate
by mean AURAC (the paper's protocol). `matryoshka-prefix` is the `matryoshka` runs read with `inference: prefix`
(evaluated, not trained). Finished runs are reused, so the script can be stopped and rerun.

    python benchmarks/study_objectives.py --output_dir runs/study            # the sweep (about 1 hour, 2 cores)
    python benchmarks/study_objectives.py --output_dir runs/study --equal_compute   # + single-function methods
                                                                                 # with as many steps of work
The study in docs/results.md ran, on the 2-core CPU VM:

    python benchmarks/study_objectives.py --output_dir runs/study --lrs 2e-3 --seeds 0,1,2 \
        --methods matryoshka,matryoshka-exact,sandwich,dylora,lora,lora-svd \
        --equal_compute --equal_compute_seeds 0,1 --equal_compute_runs 4:matryoshka+dylora+lora,3:dylora
"""
import argparse
import json
import os
import platform
import time

from matryoshka_lora.compare import SVD, aggregate, compare, share_pretrained
from matryoshka_lora.report import compare_markdown
from matryoshka_lora.evaluation import evaluate_run
from matryoshka_lora.evaluation.results import default_eval_dir
from matryoshka_lora.report import plot_rank_curves

METHODS = ["matryoshka", "matryoshka-exact", "sandwich", "dylora", "lora", "lora-svd"]
TRAIN = {
    "model": "smollm2", "data": "arithmetic", "max_examples": 800, "max_length": 160,
    "rank": 8, "train_ranks": [1, 2, 4, 8], "scaling": "none", "batch_size": 4, "max_steps": 50,
    "warmup_steps": 5, "logging_steps": 10, "save_steps": 0, "sandwich_n": 1,
}
EVAL = {"task": "arithmetic", "limit": 48, "batch_size": 48, "max_new_tokens": 48}
PREFIX = "matryoshka-prefix"  # the matryoshka runs read with inference "prefix": no training of its own
# Work per step relative to one forward/backward: |S| = 4 ranks for matryoshka-exact, 3 for sandwich (n = 1).
WORK = {"matryoshka-exact": 4, "sandwich": 3}


def prefix_entry(folder: str, seeds: list[int], eval_options: dict, metric: str | None = None) -> dict:
    """The ``matryoshka`` runs in ``folder`` read with inference "prefix" (rank k = W0 + Σ_{i≤k} P_i b_i a_iᵀ, the
    truncation of the function trained; no retraining), evaluated into each run's eval-prefix/ and aggregated as
    ``compare`` aggregates a method."""
    results, score_only = {}, eval_options.get("score_only", False)
    for seed in seeds:
        run_dir = os.path.join(folder, "matryoshka", f"seed-{seed}")
        eval_dir = default_eval_dir(run_dir, "prefix", score_only)
        share_pretrained(default_eval_dir(run_dir, score_only=score_only), eval_dir)
        results[seed] = evaluate_run(run_dir, output_dir=eval_dir, inference="prefix", **eval_options)
    return aggregate({PREFIX: results}, [PREFIX], seeds, metric)["methods"][PREFIX]


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
    rows += [(m, lr, steps, e) for m, (lr, steps, e) in (extra or {}).items()]
    for m, lr, steps, e in sorted(rows, key=lambda r: -r[3]["aurac"]):
        cells = [f"{100 * v:.1f}" for v in e["per_rank"]]
        lines.append(f"| {m} | {lr:g} | {steps} | " + " | ".join(cells) +
                     f" | {100 * e['aurac']:.1f} | {100 * e.get('log_aurac', float('nan')):.1f} |")
    lines += ["", "All learning rates:", ""]
    for lr, summary in sorted(sweeps.items()):
        lines += [f"learning rate {lr:g}:", "", compare_markdown(summary)]
    return "\n".join(lines)


def plot(sweeps: dict, extra: dict, seeds: list[int], path: str) -> None:
    """Each method at its best learning rate, and the equal-compute runs, on one rank axis."""
    first = next(iter(sweeps.values()))
    curves = {f"{m} ({TRAIN['max_steps']} steps)": [100 * v for v in e["per_rank"]]
              for m, (lr, e) in best_by_aurac(sweeps).items()}
    curves.update({f"{m.split(' (')[0]} ({n} steps)": [100 * v for v in e["per_rank"]]
                   for m, (lr, n, e) in extra.items()})
    plot_rank_curves(curves, first["ranks"], 100 * first["pretrained"], f"{first['metric']} (%)",
                     f"arithmetic, SmolLM2-135M, R=8, mean over seeds {seeds}", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/study")
    p.add_argument("--lrs", default="5e-4,2e-3")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--equal_compute", action="store_true",
                   help="also train matryoshka, dylora and lora at their best lr for 4x the steps")
    p.add_argument("--equal_compute_seeds", help="seeds of the equal-compute runs (default: --seeds)")
    p.add_argument("--equal_compute_runs", default="4:matryoshka+dylora+lora",
                   help="FACTOR:METHOD+METHOD,...: train those methods FACTOR times as many steps (sandwich with "
                        "n=1 does 3x the work per step, matryoshka-exact 4x), e.g. 4:matryoshka+dylora+lora,3:dylora")
    args = p.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    started = time.perf_counter()
    sweeps = {lr: compare(None, methods, seeds, os.path.join(args.output_dir, f"lr-{lr:g}"),
                          dict(TRAIN, learning_rate=lr), EVAL) for lr in lrs}
    if "matryoshka" in methods:
        for lr, summary in sweeps.items():
            summary["methods"][PREFIX] = prefix_entry(os.path.join(args.output_dir, f"lr-{lr:g}"), seeds, EVAL)
    extra = {}
    if args.equal_compute:
        best = best_by_aurac(sweeps)
        ec_seeds = [int(x) for x in args.equal_compute_seeds.split(",")] if args.equal_compute_seeds else seeds
        for spec in args.equal_compute_runs.split(","):
            factor, names = int(spec.split(":")[0]), spec.split(":")[1].split("+")
            steps = TRAIN["max_steps"] * factor
            for m in names:
                lr = best[m][0]
                group = [m, SVD] if m == "lora" else [m]  # lora-svd re-factors the same lora run
                folder = f"equal-{m}-lr-{lr:g}" if factor == 4 else f"equal{factor}x-{m}-lr-{lr:g}"
                s = compare(None, group, ec_seeds, os.path.join(args.output_dir, folder),
                            dict(TRAIN, learning_rate=lr, max_steps=steps), EVAL)
                extra.update({f"{g} ({factor}x steps)": (lr, steps, s["methods"][g]) for g in group})
                if m == "matryoshka":
                    entry = prefix_entry(os.path.join(args.output_dir, folder), ec_seeds, EVAL)
                    extra[f"{PREFIX} ({factor}x steps)"] = (lr, steps, entry)
    text = report(sweeps, seeds, extra)
    if extra:
        text += f"\nrows with (Nx steps): the single-function methods trained N times as many steps, mean over seeds {ec_seeds}\n"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    text += f"\nmeasured on {machine} in {(time.perf_counter() - started) / 60:.0f} min\n"
    with open(os.path.join(args.output_dir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump({"sweeps": {str(lr): s for lr, s in sweeps.items()},
                   "extra": {m: {"lr": lr, "steps": n, **e} for m, (lr, n, e) in extra.items()}}, f, indent=2)
    plot(sweeps, extra, seeds, os.path.join(args.output_dir, "study.png"))
    print(text)


if __name__ == "__main__":
    main()
