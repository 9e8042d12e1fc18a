r"""Issue 20 study: can a nested-rank objective beat plain LoRA re-factored by SVD (`lora-svd`), at equal compute?

Every method gets the same budget of forward/backward passes of 4 examples (4x the budgets of docs/results.md: 200
on arithmetic, 256 on GSM8K): a method stacking w ranks per step trains budget / w steps (`distill` with
sandwich_n 1: 3, `dylora-distill`: 2, counted as if k < R every step; `matryoshka-exact`: |S|). Candidates:

    dylora            the best objective that trains nested ranks (the default of `train` until this study)
    lora-svd          plain LoRA, re-factored by SVD after training (the bar; the default of `train` since)
    distill           in-place distillation with the sandwich draw (slimmable networks / once-for-all)
    dylora-distill    one drawn rank on the KL to rank R, R on the labels
    dylora-frozen     DyLoRA with its paper's update (only the new slice trains)
    dylora-small      dylora drawing rank r with probability ∝ 1 / (1 + log2 r) (towards small ranks)
    dylora-aurac      dylora drawing rank r with the weight AURAC gives it (towards large ranks: R = 8 draws
                      1, 2, 4, 8 with 1/14, 3/14, 6/14, 4/14), so the expected loss weights ranks as the score does
    lora-svd-dylora   LoRA for 85 % of the steps, svd, DyLoRA for the last 15 % from the re-factored adapter

Two stages, both resumable (finished runs and evaluations are reused, so stop and rerun at will, over sessions):
1. the learning-rate sweep on --sweep_seeds (default 0), every method at every --lrs;
2. --seeds (default 0,1,2) at each method's best rate by mean AURAC on the sweep seeds.
Every finished (method, lr, seed) is also written to a ledger kept in the repository (--ledger, default
benchmarks/study_nested-TASK-rR.json): its per-rank scores under a digest of the exact settings, the wall minutes
(training and evaluation, pauses included; less where a finished run folder was reused) and the machine. A later
session, whose runs/ folder is empty, reads them from there instead of training again; changed settings (budget,
evaluation, ranks) do not match the digest, so they train afresh.
The table: per-rank values, AURAC mean ± sd over --seeds, and each method's AURAC minus lora-svd's with whether the
gap exceeds the seed spread (the issue's goal: >= 1.0 on both tasks).

    python benchmarks/study_nested.py --task arithmetic --rank 8 --output_dir runs/study-nested/arithmetic-r8
    python benchmarks/study_nested.py --task gsm8k --data ../shared/data/gsm8k --rank 8 \
        --output_dir runs/study-nested/gsm8k-r8
    # R = 32 (S = 1, 2, 4, 8, 16, 32): --rank 32; a first look: --lrs 2e-3 --seeds 0 --methods dylora,lora-svd
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import time

import torch

from matryoshka_lora.compare import SVD, compare, over_seeds
from matryoshka_lora.evaluation.results import default_eval_dir
from matryoshka_lora.files import write_json
from matryoshka_lora.ranks import aurac, default_train_ranks
from matryoshka_lora.report import plot_rank_curves

METHODS = ["dylora", "lora-svd", "distill", "dylora-distill", "dylora-frozen", "dylora-small", "lora-svd-dylora",
           "dylora-aurac"]
TASKS = {  # train settings, passes per run, evaluation, the metric tabulated
    "arithmetic": dict(train={"data": "arithmetic", "max_length": 160}, budget=200, metric="exact_match_strict",
                       eval={"task": "arithmetic", "limit": 200, "batch_size": 50, "max_new_tokens": 48}),
    "gsm8k": dict(train={"max_length": 256}, budget=256, metric="token_acc",
                  eval={"limit": 500, "batch_size": 16, "score_only": True}),
}


def work(method: str, ranks: list[int], sandwich_n: int = 1) -> int:
    """Forward/backward passes of one optimizer step."""
    return {"distill": 2 + min(sandwich_n, len(ranks) - 2), "sandwich": 2 + min(sandwich_n, len(ranks) - 2),
            "dylora-distill": 2, "matryoshka-exact": len(ranks)}.get(method, 1)


def small_first(ranks: list[int]) -> list[float]:
    """The draw of dylora-small: p(r) ∝ 1 / (1 + log2 r), normalised."""
    w = [1 / (1 + math.log2(r)) for r in ranks]
    return [x / sum(w) for x in w]


def aurac_weights(ranks: list[int]) -> list[float]:
    """The draw of dylora-aurac: rank r's weight in AURAC (the score's change per point at rank r; they sum to 1)."""
    return [aurac(ranks, [float(i == j) for j in range(len(ranks))]) for i in range(len(ranks))]


def settings(args, method: str) -> tuple[str, dict]:
    """(the method compare trains, the train settings of this study for ``method``)."""
    task, ranks = TASKS[args.task], default_train_ranks(args.rank)
    train = {"model": args.model, "rank": args.rank, "train_ranks": ranks, "scaling": "none", "batch_size": 4,
             "warmup_steps": 0.05, "logging_steps": 10, "save_steps": 0, "sandwich_n": 1,
             "max_examples": args.budget * 4, **task["train"]}
    if args.task == "gsm8k":
        train["data"] = args.data or "gsm8k"
    if method == "dylora-small":
        return "dylora", dict(train, dylora_probs=small_first(ranks))
    if method == "dylora-aurac":
        return "dylora", dict(train, dylora_probs=aurac_weights(ranks))
    return method, train


def machine() -> str:
    """The CPU model and core count (Linux names the model only in /proc/cpuinfo), e.g. for minutes to compare."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores{gpu}"


def digest(train: dict, ev: dict, metric: str) -> str:
    """What makes two runs' scores comparable: every train and eval setting and the metric (lr and seed are keys)."""
    text = json.dumps({"train": train, "eval": ev, "metric": metric}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_ledger(path: str) -> dict:
    if not os.path.isfile(path):
        return {"runs": {}}
    with open(path) as f:
        return json.load(f)


def one_seed(args, method: str, lr: float, seed: int, folder: str, train: dict, ev: dict) -> dict:
    """``method`` at ``lr`` for ``seed``: the ledger's record when its settings match, else trained (or reused from
    ``folder``), evaluated and recorded. {"per_rank", "aurac", "log_aurac", ...}."""
    trained, metric = settings(args, method)[0], TASKS[args.task]["metric"]
    key, sig = f"{method} lr={lr:g} seed={seed}", digest(train, ev, metric)
    ledger = read_ledger(args.ledger)
    if ledger["runs"].get(key, {}).get("digest") == sig:
        return ledger["runs"][key]
    started = time.perf_counter()
    summary = compare(None, [trained], [seed], folder, train, ev, metric=metric, pretrained_from=args.pretrained_from)
    record = summary["methods"][trained]["per_seed"][str(seed)]
    # the base model's score is the same for every run: evaluated once, then shared (compare reuses it)
    args.pretrained_from = args.pretrained_from or default_eval_dir(record["run_dir"],
                                                                    score_only=bool(ev.get("score_only")))
    ledger = read_ledger(args.ledger)  # another invocation may have added runs meanwhile
    ledger.update(ranks=summary["ranks"], pretrained=summary["pretrained"])
    ledger["runs"][key] = {k: v for k, v in record.items() if k != "run_dir"} | {
        "digest": sig, "wall_minutes": round((time.perf_counter() - started) / 60, 1), "machine": machine(),
        "date": datetime.date.today().isoformat()}
    write_json(args.ledger, ledger)
    return ledger["runs"][key]


def run(args, method: str, lr: float, seeds: list[int]) -> dict:
    """``method`` at ``lr`` over ``seeds`` (from the ledger, or trained): its entry, with its steps and passes."""
    trained, train = settings(args, method)
    steps = max(1, args.budget // work(trained, train["train_ranks"]))
    folder = os.path.join(args.output_dir, f"lr-{lr:g}", method)
    train = dict(train, learning_rate=lr, max_steps=steps)
    ev = dict(TASKS[args.task]["eval"], ranks=train["train_ranks"])
    entry = over_seeds({str(s): one_seed(args, method, lr, s, folder, train, ev) for s in seeds})
    ledger = read_ledger(args.ledger)
    return entry | {"steps": steps, "passes": steps * work(trained, train["train_ranks"]), "lr": lr,
                    "ranks": ledger["ranks"], "pretrained": ledger["pretrained"]}


def spread(e: dict) -> float:
    """AURAC's sample standard deviation over the seeds (nan for one seed)."""
    return e.get("aurac_stdev", float("nan"))


def aurac_cell(e: dict) -> str:
    sd = spread(e)
    return f"{100 * e['aurac']:.1f}" + (f" ± {100 * sd:.1f}" if sd == sd else " (one seed)")


def report(args, final: dict, sweep: dict, seeds: list[int], minutes: float) -> str:
    first = next(iter(final.values()))
    ranks, bar = first["ranks"], final.get(SVD)
    lines = [f"{args.task}, R = {args.rank}, {TASKS[args.task]['metric']} (%), mean over seeds {seeds}, each method "
             f"at its best learning rate on the sweep seeds; pretrained {100 * first['pretrained']:.1f}", "",
             "| method | lr | steps | passes | " + " | ".join(f"r={k}" for k in ranks) +
             " | AURAC ± sd | log-AURAC | vs lora-svd |", "|" + "---|" * (len(ranks) + 7)]
    for m, e in sorted(final.items(), key=lambda kv: -kv[1]["aurac"]):
        gap = ""
        if bar is not None and m != SVD:
            d, noise = 100 * (e["aurac"] - bar["aurac"]), 100 * max(spread(e), spread(bar))
            gap = f"{d:+.1f}" + (" (> sd)" if abs(d) > noise else " (within sd)" if noise == noise else "")
        lines.append(f"| {m} | {e['lr']:g} | {e['steps']} | {e['passes']} | " +
                     " | ".join(f"{100 * v:.1f}" for v in e["per_rank"]) +
                     f" | {aurac_cell(e)} | {100 * e['log_aurac']:.1f} | {gap} |")
    lines += ["", "The sweep (AURAC, mean over the sweep seeds):", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in sorted(sweep)) + " |", "|" + "---|" * (len(sweep) + 1)]
    for m in dict.fromkeys(m for s in sweep.values() for m in s):
        lines.append(f"| {m} | " + " | ".join(f"{100 * sweep[lr][m]['aurac']:.1f}" if m in sweep[lr] else "—"
                                             for lr in sorted(sweep)) + " |")
    lines += ["", f"budget {args.budget} passes of 4 examples per run; "
                  f"this invocation: {minutes:.0f} min on {machine()}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    p.add_argument("--data", default=None, help="gsm8k: a folder with train/test.jsonl (default: openai/gsm8k)")
    p.add_argument("--model", default="smollm2", help="the base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rank", type=int, default=8, help="R; S = powers of two up to R")
    p.add_argument("--budget", type=int, default=None, help="passes of 4 examples per run (default: the task's)")
    p.add_argument("--lrs", default="1e-3,3e-3,9e-3", help="learning rates of the sweep, comma-separated")
    p.add_argument("--sweep_seeds", default="0", help="seeds the sweep picks each method's rate on")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the final table, at each method's best rate")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from the list above (default: all)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--ledger", default=None, help="the results kept in the repo (default: "
                   "benchmarks/study_nested-TASK-rR.json next to this script)")
    args = p.parse_args()
    args.budget, args.pretrained_from = args.budget or TASKS[args.task]["budget"], None
    args.ledger = args.ledger or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              f"study_nested-{args.task}-r{args.rank}.json")
    methods, lrs = args.methods.split(","), [float(x) for x in args.lrs.split(",")]
    sweep_seeds, seeds = ([int(s) for s in text.split(",")] for text in (args.sweep_seeds, args.seeds))
    started = time.perf_counter()
    sweep = {lr: {m: run(args, m, lr, sweep_seeds) for m in methods} for lr in lrs}
    best = {m: max(lrs, key=lambda lr: sweep[lr][m]["aurac"]) for m in methods}
    final = {m: run(args, m, best[m], seeds) for m in methods}
    text = report(args, final, sweep, seeds, (time.perf_counter() - started) / 60)
    with open(os.path.join(args.output_dir, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump({"final": final, "sweep": {str(lr): s for lr, s in sweep.items()}}, f, indent=2)
    first = next(iter(final.values()))
    plot_rank_curves({f"{m} (lr {e['lr']:g})": [100 * v for v in e["per_rank"]] for m, e in final.items()},
                     first["ranks"], 100 * first["pretrained"], f"{TASKS[args.task]['metric']} (%)",
                     f"{args.task}, SmolLM2-135M, R={args.rank}, {args.budget} passes, seeds {seeds}",
                     os.path.join(args.output_dir, "study.png"))
    print(text)


if __name__ == "__main__":
    main()
