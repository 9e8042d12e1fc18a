r"""Issue 8 study (b): which objective gives the best rank curve on GSM8K, at equal compute.

Every method gets the same budget of forward/backward passes (batch 4): `matryoshka`, `dylora` and `lora` train
for BUDGET optimizer steps, `sandwich` (n = 1: ranks R, 1 and one drawn) for BUDGET / 3, `matryoshka-exact` for
BUDGET / |S|; `lora-svd` re-factors the `lora` run and `matryoshka-prefix` reads the `matryoshka` run with
`inference: prefix` (the truncation of the trained function). Each run is evaluated on the first LIMIT GSM8K
test problems at ranks 1, 2, 4, 8 by answer-token accuracy (teacher-forced: the share of the reference answer's tokens the
model predicts, the metric of the issue's reference run) and by 0-shot greedy exact match (lm-eval's strict
`#### N` filter). Each method is reported at its best learning rate by mean token-accuracy AURAC over --seeds;
--confirm_seeds are then run only at that learning rate, and the tables average every seed (± the standard
deviation of AURAC across seeds); with --confirm_score_only those seeds are evaluated by answer-token accuracy
alone (no generation, about a quarter of the time on a CPU) and the exact-match table averages --seeds only.
Finished runs and evaluations are reused, so the script can be stopped and rerun, and seeds added later.

    python benchmarks/study_gsm8k.py --data path/to/gsm8k --output_dir runs/study-gsm8k   # local JSONL
    python benchmarks/study_gsm8k.py --output_dir runs/study-gsm8k                         # openai/gsm8k (hub)

The defaults are sized for a 2-core CPU (SmolLM2-135M, 96 passes of 4 examples, 64 test problems: about
an hour per learning rate and seed, most of it generation); on a GPU raise --budget and --limit (--budget 1868
is one epoch). The study in docs/results.md ran, on the 2-core CPU VM, the sweep on seed 0, then seed 1 at each
method's chosen rate:

    python benchmarks/study_gsm8k.py --data ../shared/data/gsm8k --output_dir runs/study-gsm8k --seeds 0 \
        --budget 64 --limit 48 --max_new_tokens 200 --lrs 1e-3,3e-3,9e-3:dylora+lora+lora-svd+matryoshka
    python benchmarks/study_gsm8k.py --data ../shared/data/gsm8k --output_dir runs/study-gsm8k --seeds 0 \
        --confirm_seeds 1 --confirm_score_only --budget 64 --limit 48 --max_new_tokens 200 \
        --lrs 3e-3:matryoshka-exact+sandwich+dylora+lora-svd,9e-3:matryoshka+lora
"""
import argparse
import json
import os
import platform
import time

from study_objectives import PREFIX, best_by_aurac, prefix_entry

from matryoshka_lora.compare import compare, over_seeds
from matryoshka_lora.evaluation.results import default_eval_dir
from matryoshka_lora.report import plot_rank_curves

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


def run_lr(args, lr: float, seeds: list[int], methods: list[str], pretrained_from: str | None,
           score_only: bool = False) -> tuple[dict, str]:
    """({metric: summary}, an eval folder holding the base model's score) at one learning rate: every method at
    its equal-compute number of steps. The base model's score is the same for every run: evaluated once (or taken
    from ``pretrained_from``), then reused. ``score_only``: answer-token accuracy alone, no generation."""
    groups = {}
    for m in methods:
        groups.setdefault(steps_of(m, args.budget), []).append(m)
    ev = {"task": args.data, "ranks": RANKS, "limit": args.limit, "batch_size": args.eval_batch_size,
          "max_new_tokens": args.max_new_tokens, "score_only": score_only}
    metrics = ["token_acc"] if score_only else list(METRICS)
    out = {}
    for steps, group in sorted(groups.items()):
        folder = os.path.join(args.output_dir, f"lr-{lr:g}", f"steps-{steps}")
        train = dict(train_settings(args), learning_rate=lr, max_steps=steps)
        for metric in metrics:  # the second pass only re-reads the saved evaluations
            s = compare(None, group, seeds, folder, train, ev, metric=metric, pretrained_from=pretrained_from)
            first_run = os.path.join(folder, group[0], f"seed-{seeds[0]}")
            pretrained_from = pretrained_from or default_eval_dir(first_run, score_only=score_only)
            merged = out.setdefault(metric, {k: v for k, v in s.items() if k != "methods"} | {"methods": {}})
            merged["methods"].update({m: e | {"steps": steps} for m, e in s["methods"].items()})
    if "matryoshka" in methods:
        steps = steps_of("matryoshka", args.budget)
        folder = os.path.join(args.output_dir, f"lr-{lr:g}", f"steps-{steps}")
        for metric in metrics:  # the second metric re-reads the saved evaluations
            out[metric]["methods"][PREFIX] = prefix_entry(folder, seeds, ev, metric) | {"steps": steps}
    return out, pretrained_from


def with_seeds(entry: dict, more: dict) -> dict:
    """``entry`` (a method over some seeds) joined by ``more`` (the same method over other seeds)."""
    return over_seeds(entry["per_seed"] | more["per_seed"]) | {"steps": entry["steps"]}


def spread(e: dict) -> str:
    """The AURAC's standard deviation over seeds (sample), or "" for one seed."""
    return f" ± {100 * e['aurac_stdev']:.1f}" if "aurac_stdev" in e else ""


def choose(sweeps: dict) -> dict:
    """{method: (lr, {metric: entry})}: each method at its best learning rate by mean token-accuracy AURAC."""
    best = best_by_aurac({lr: s["token_acc"] for lr, s in sweeps.items()})
    return {m: (lr, {metric: sweeps[lr][metric]["methods"][m] for metric in METRICS}) for m, (lr, _) in best.items()}


def table(chosen: dict, metric: str, seeds: list[int], pretrained: dict) -> str:
    lines = [f"{METRICS[metric]} ({metric}, %), mean over seeds {seeds}; pretrained: {100 * pretrained[metric]:.1f}",
             "", "| method | lr | steps | passes | " + " | ".join(f"r={k}" for k in RANKS) + " | AURAC ± sd | log-AURAC |",
             "|" + "---|" * (len(RANKS) + 6)]
    rows = [(m, lr, entries[metric]) for m, (lr, entries) in chosen.items()]
    for m, lr, e in sorted(rows, key=lambda r: -r[2]["aurac"]):
        passes = e["steps"] * WORK.get(m, 1)
        cells = " | ".join(f"{100 * v:.1f}" for v in e["per_rank"])
        lines.append(f"| {m} | {lr:g} | {e['steps']} | {passes} | {cells} | {100 * e['aurac']:.1f}{spread(e)} | "
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
    p.add_argument("--seeds", default="0", help="seeds of the learning-rate sweep")
    p.add_argument("--confirm_seeds", default="",
                   help="more seeds, run only at each method's best learning rate on --seeds; tables average all seeds")
    p.add_argument("--confirm_score_only", action="store_true",
                   help="evaluate the --confirm_seeds by answer-token accuracy alone (no generation, several times "
                        "faster): the exact-match table then averages --seeds only")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", type=int, default=96, help="forward/backward passes of 4 examples per run")
    p.add_argument("--limit", type=int, default=64, help="GSM8K test problems evaluated")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    args = p.parse_args()
    lrs = parse_lrs(args.lrs, args.methods.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    confirm = [int(s) for s in args.confirm_seeds.split(",") if s]
    started = time.perf_counter()
    sweeps, pretrained_from = {}, None
    for lr, methods in lrs.items():
        sweeps[lr], pretrained_from = run_lr(args, lr, seeds, methods, pretrained_from)
    chosen = choose(sweeps)
    score_from = None  # the base model's score-only evaluation, shared like pretrained_from
    if confirm:  # the learning rate is chosen on --seeds alone, so the extra seeds do not pick their own winner
        by_lr = {}
        for m, (lr, _) in chosen.items():
            by_lr.setdefault(lr, []).append(m)
        for lr, methods in by_lr.items():
            trained = list(dict.fromkeys("matryoshka" if m == PREFIX else m for m in methods))
            if args.confirm_score_only:
                s, score_from = run_lr(args, lr, confirm, trained, score_from, score_only=True)
                chosen.update({m: (lr, chosen[m][1] | {"token_acc": with_seeds(chosen[m][1]["token_acc"],
                                                                               s["token_acc"]["methods"][m])})
                               for m in methods})
            else:
                s, pretrained_from = run_lr(args, lr, seeds + confirm, trained, pretrained_from)
                chosen.update({m: (lr, {metric: s[metric]["methods"][m] for metric in METRICS}) for m in methods})
    all_seeds = seeds + confirm
    em_seeds = seeds if args.confirm_score_only else all_seeds
    pretrained = {metric: s["pretrained"] for metric, s in next(iter(sweeps.values())).items()}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    chosen_by = f"learning rate chosen on seeds {seeds}" + (f", then run with seeds {confirm} too" if confirm else "")
    if confirm and args.confirm_score_only:
        chosen_by += " (evaluated by answer-token accuracy alone)"
    text = "\n\n".join([table(chosen, "token_acc", all_seeds, pretrained),
                        table(chosen, "exact_match_strict", em_seeds, pretrained), chosen_by,
                        f"All learning rates (AURAC, mean over seeds {seeds}):", all_lrs(sweeps),
                        f"budget {args.budget} passes of 4 examples, {args.limit} test problems; measured on {machine} "
                        f"in {(time.perf_counter() - started) / 60:.0f} min"]) + "\n"
    with open(os.path.join(args.output_dir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump({"sweeps": {str(lr): s for lr, s in sweeps.items()},
                   "chosen": {m: {"lr": lr, **entries} for m, (lr, entries) in chosen.items()}}, f, indent=2)
    curves = {f"{m} (lr {lr:g}, {e['token_acc']['steps']} steps)": [100 * v for v in e["token_acc"]["per_rank"]]
              for m, (lr, e) in chosen.items()}
    plot_rank_curves(curves, RANKS, 100 * pretrained["token_acc"], "answer-token accuracy (%)",
                     f"GSM8K, SmolLM2-135M, R=8, {args.budget} passes each, seeds {all_seeds}",
                     os.path.join(args.output_dir, "study.png"))
    print(text)

if __name__ == "__main__":
    main()
