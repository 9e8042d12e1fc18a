"""Issue 8 study (b): which objective gives the best rank curve on GSM8K, at equal compute.

Every method gets the same budget of forward/backward passes (batch 4): `matryoshka`, `dylora` and `lora` train
for BUDGET optimizer steps, `sandwich` (n = 1: ranks R, 1 and one drawn) for BUDGET / 3, `matryoshka-exact` for
BUDGET / |S|; `lora-svd` re-factors the `lora` run. Each run is evaluated on the first LIMIT GSM8K test problems
at ranks 1, 2, 4, 8 by answer-token accuracy (teacher-forced: the share of the reference answer's tokens the
model predicts, the metric of the issue's reference run) and by 0-shot greedy exact match (lm-eval's strict
`#### N` filter). Each method is reported at its best learning rate by mean token-accuracy AURAC. Finished runs
and evaluations are reused, so the script can be stopped and rerun, and more seeds added later.

    python benchmarks/study_gsm8k.py --data path/to/gsm8k --output_dir runs/study-gsm8k   # local JSONL
    python benchmarks/study_gsm8k.py --output_dir runs/study-gsm8k                         # openai/gsm8k (hub)

The defaults are sized for a 2-core CPU (SmolLM2-135M, 96 passes of 4 examples, 64 test problems: about
an hour per learning rate and seed, most of it generation); on a GPU raise --budget and --limit (--budget 1868
is one epoch). The study in docs/results.md ran, on the 2-core CPU VM (about 2 hours):

    python benchmarks/study_gsm8k.py --data ../shared/data/gsm8k --output_dir runs/study-gsm8k --seeds 0 \
        --budget 64 --limit 48 --max_new_tokens 200 --lrs 1e-3,3e-3,9e-3:dylora+lora+lora-svd+matryoshka
"""
import argparse
import json
import os
import platform
import time

from study_objectives import best_by_aurac

from matryoshka_lora.compare import compare
from matryoshka_lora.evaluate import plot_rank_curves

METHODS = ["matryoshka", "matryoshka-exact", "sandwich", "dylora", "lora", "lora-svd"]
RANKS = [1, 2, 4, 8]
# forward/backward passes per optimizer step: |S| stacked ranks for exact, R + smallest + n = 1 drawn for sandwich
WORK = {"matryoshka-exact": len(RANKS), "sandwich": 3}
METRICS = {"token_acc": "answer-token accuracy", "exact_match_strict": "0-shot exact match"}


def train_settings(args) -> dict:
    return {"model": args.model, "data": args.data, "max_examples": args.budget * 4, "max_length": 256,
            "rank": RANKS[-1], "train_ranks": RANKS, "scaling": "none", "batch_size": 4, "warmup_steps": 0.05,
            "logging_steps": 8, "save_steps": 0, "sandwich_n": 1}


def steps_of(method: str, budget: int) -> int:
    return max(1, budget // WORK.get(method, 1))


def run_lr(args, lr: float, seeds: list[int], methods: list[str], pretrained_from: str | None) -> tuple[dict, str]:
    """({metric: summary}, an eval folder holding the base model's score) at one learning rate: every method at
    its equal-compute number of steps. The base model's score is the same for every run: evaluated once (or taken
    from ``pretrained_from``), then reused."""
    groups = {}
    for m in methods:
        groups.setdefault(steps_of(m, args.budget), []).append(m)
    ev = {"task": args.data, "ranks": RANKS, "limit": args.limit, "batch_size": args.eval_batch_size,
          "max_new_tokens": args.max_new_tokens}
    out = {}
    for steps, group in sorted(groups.items()):
        folder = os.path.join(args.output_dir, f"lr-{lr:g}", f"steps-{steps}")
        train = dict(train_settings(args), learning_rate=lr, max_steps=steps)
        for metric in METRICS:  # the second pass only re-reads the saved evaluations
            s = compare(None, group, seeds, folder, train, ev, metric=metric, pretrained_from=pretrained_from)
            pretrained_from = pretrained_from or os.path.join(folder, group[0], f"seed-{seeds[0]}", "eval")
            merged = out.setdefault(metric, {k: v for k, v in s.items() if k != "methods"} | {"methods": {}})
            merged["methods"].update({m: e | {"steps": steps} for m, e in s["methods"].items()})
    return out, pretrained_from


def table(sweeps: dict, metric: str, seeds: list[int]) -> str:
    """Each method at its best learning rate by mean token-accuracy AURAC."""
    best = best_by_aurac({lr: s["token_acc"] for lr, s in sweeps.items()})
    first = next(iter(sweeps.values()))[metric]
    lines = [f"{METRICS[metric]} ({metric}, %), mean over seeds {seeds}; pretrained: {100 * first['pretrained']:.1f}",
             "", "| method | lr | steps | passes | " + " | ".join(f"r={k}" for k in RANKS) + " | AURAC | log-AURAC |",
             "|" + "---|" * (len(RANKS) + 6)]
    rows = [(m, lr, sweeps[lr][metric]["methods"][m]) for m, (lr, _) in best.items()]
    for m, lr, e in sorted(rows, key=lambda r: -r[2]["aurac"]):
        passes = e["steps"] * WORK.get(m, 1)
        cells = " | ".join(f"{100 * v:.1f}" for v in e["per_rank"])
        lines.append(f"| {m} | {lr:g} | {e['steps']} | {passes} | {cells} | {100 * e['aurac']:.1f} | "
                     f"{100 * e['log_aurac']:.1f} |")
    return "\n".join(lines)


def all_lrs(sweeps: dict) -> str:
    lines = ["| method | " + " | ".join(f"lr {lr:g}: tok-acc AURAC / EM AURAC" for lr in sorted(sweeps)) + " |",
             "|" + "---|" * (len(sweeps) + 1)]
    methods = dict.fromkeys(m for s in sweeps.values() for m in s["token_acc"]["methods"])
    for m in methods:
        cells = [f"{100 * sweeps[lr]['token_acc']['methods'][m]['aurac']:.1f} / "
                 f"{100 * sweeps[lr]['exact_match_strict']['methods'][m]['aurac']:.1f}"
                 if m in sweeps[lr]["token_acc"]["methods"] else "—" for lr in sorted(sweeps)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_lrs(text: str, methods: list[str]) -> dict[float, list[str]]:
    """'1e-3,3e-3,9e-3:dylora+lora' -> {lr: the methods trained at it} (a bare lr: all of --methods)."""
    out = {}
    for item in text.split(","):
        lr, _, only = item.partition(":")
        out[float(lr)] = only.split("+") if only else methods
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="gsm8k", help="gsm8k (the hub's openai/gsm8k) or a folder with train/test.jsonl")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--output_dir", default="runs/study-gsm8k")
    p.add_argument("--lrs", default="1e-3,3e-3",
                   help="learning rates, each optionally limited to some methods: 1e-3,3e-3,9e-3:dylora+lora")
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", type=int, default=96, help="forward/backward passes of 4 examples per run")
    p.add_argument("--limit", type=int, default=64, help="GSM8K test problems evaluated")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    args = p.parse_args()
    lrs = parse_lrs(args.lrs, args.methods.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    sweeps, pretrained_from = {}, None
    for lr, methods in lrs.items():
        sweeps[lr], pretrained_from = run_lr(args, lr, seeds, methods, pretrained_from)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    text = "\n\n".join([table(sweeps, "token_acc", seeds), table(sweeps, "exact_match_strict", seeds),
                        "All learning rates (AURAC, mean over seeds):", all_lrs(sweeps),
                        f"budget {args.budget} passes of 4 examples, {args.limit} test problems; measured on {machine} "
                        f"in {(time.perf_counter() - started) / 60:.0f} min"]) + "\n"
    with open(os.path.join(args.output_dir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump({str(lr): s for lr, s in sweeps.items()}, f, indent=2)
    best = best_by_aurac({lr: s["token_acc"] for lr, s in sweeps.items()})
    first = next(iter(sweeps.values()))["token_acc"]
    curves = {f"{m} (lr {lr:g}, {e['steps']} steps)": [100 * v for v in e["per_rank"]] for m, (lr, e) in best.items()}
    plot_rank_curves(curves, RANKS, 100 * first["pretrained"], "answer-token accuracy (%)",
                     f"GSM8K, SmolLM2-135M, R=8, {args.budget} passes each, seeds {seeds}",
                     os.path.join(args.output_dir, "study.png"))
    print(text)


if __name__ == "__main__":
    main()
