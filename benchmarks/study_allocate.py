r"""Issue 18 study: per-layer rank profiles against uniform ranks, at the same adapter parameters.

For each seed: train the config (default: configs/smollm2-arithmetic.yaml, DyLoRA R = 8 on every linear layer of
the embedded SmolLM2-135M; reused when finished), then `allocate` it at --budgets with each --scores (calibration:
--limit training examples held out from the run), and score the uniform train ranks and the profiles on the first
--eval_limit examples of the run's eval split (answer-token accuracy, teacher-forced). Printed per seed and score:
accuracy against parameters, and at each budget the share of the gap between the uniform rank of that many
parameters and the full adapter that the profile recovers (the issue's goal: >= 0.5 at 25 %).

    python benchmarks/study_allocate.py --output_dir runs/study-allocate --seeds 0,1
    python benchmarks/study_allocate.py --config configs/smollm2-gsm8k.yaml --data ../shared/data/gsm8k \
        --output_dir runs/study-allocate-gsm8k --method matryoshka --learning_rate 9e-3 --seeds 0,1 --scores taylor
    # a larger calibration set: add --limit 64 (profiles then go to profiles-...-cal64)
"""
import argparse
import json
import os
import platform

import torch

from matryoshka_lora.allocate_run import allocate_run
from matryoshka_lora.files import read_yaml
from matryoshka_lora.rundir import COMPLETE
from matryoshka_lora.training.config import build_config
from matryoshka_lora.training.run import train

CALIBRATION = 16  # held-out training examples the search measures on, by default


def trained(args, seed: int) -> str:
    out = os.path.join(args.output_dir, f"run-{args.method}-seed{seed}" if args.method else f"run-seed{seed}")
    if os.path.isfile(os.path.join(out, COMPLETE)):
        return out
    overrides = {"seed": seed, "output_dir": out, "overwrite": True}
    if args.data:
        overrides["data"] = args.data
    for key in ("max_steps", "method", "learning_rate"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    train(build_config(read_yaml(args.config), overrides, args.config))
    return out


def gap_recovered(summary: dict, share: float) -> tuple[float, float, float, float]:
    """(uniform accuracy at ``share``, profile accuracy, full accuracy, share of the gap recovered)."""
    uniform = {round(u["share"], 6): u["eval"]["token_acc"] for u in summary["uniform"]}
    profile = next(p["eval"]["token_acc"] for p in summary["profiles"] if abs(float(p["budget"]) - share) < 1e-9)
    low, full = uniform.get(round(share, 6)), uniform[1.0]
    if low is None or full <= low:  # no gap to recover: the full adapter is not above the uniform rank
        return low, profile, full, float("nan")
    return low, profile, full, (profile - low) / (full - low)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2-arithmetic.yaml")
    p.add_argument("--data", default=None, help="override the config's data")
    p.add_argument("--max_steps", type=int, default=None, help="override the config's max_steps")
    p.add_argument("--method", default=None, help="override the config's method (runs are then named run-METHOD-seedN)")
    p.add_argument("--learning_rate", type=float, default=None, help="override the config's learning_rate")
    p.add_argument("--output_dir", default="runs/study-allocate")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--budgets", default="0.25,0.5")
    p.add_argument("--scores", default="taylor,drop")
    p.add_argument("--limit", type=int, default=CALIBRATION, help="calibration examples")
    p.add_argument("--eval_limit", type=int, default=200)
    p.add_argument("--refine", type=int, default=3)
    args = p.parse_args()
    budgets = args.budgets.split(",")
    results = {}
    for seed in map(int, args.seeds.split(",")):
        run = trained(args, seed)
        for score in args.scores.split(","):
            tag = f"{args.method}-" if args.method else ""
            cal = "" if args.limit == CALIBRATION else f"-cal{args.limit}"  # the first studies' folders keep their names
            out = os.path.join(args.output_dir, f"profiles-{tag}seed{seed}-{score}{cal}")
            summary_file = os.path.join(out, "profiles.json")
            if not os.path.isfile(summary_file):
                allocate_run(run, budgets, limit=args.limit, score=score, refine=args.refine, seed=seed,
                             eval_limit=args.eval_limit, output_dir=out)
            results[(seed, score)] = json.load(open(summary_file))
    print(f"\n{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.config}"
          f"{' data ' + args.data if args.data else ''}{' method ' + args.method if args.method else ''}; calibration {args.limit} held-out examples; "
          f"eval: {next(iter(results.values()))['eval_data']}")
    print("| seed | score | budget | uniform acc at that size | profile acc | full (R) acc | gap recovered | "
          "forward passes |")
    print("|---|---|---|---|---|---|---|---|")
    for (seed, score), summary in results.items():
        for row in summary["profiles"]:
            low, prof, full, rec = gap_recovered(summary, float(row["budget"]))
            print(f"| {seed} | {score} | {row['budget']} | {low:.2%} | {prof:.2%} | {full:.2%} | {rec:.2f} | "
                  f"{row['forward_passes']} |")


if __name__ == "__main__":
    main()
