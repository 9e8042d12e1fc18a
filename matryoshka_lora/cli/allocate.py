"""`matryoshka-lora allocate RUN_DIR --budget B`: per-layer rank profiles under a parameter budget."""
import argparse
import os

from ..allocate import GRIDS, SCORES
from ..allocate_run import allocate_run, profiles_table
from ..errors import ArgumentParser, UserError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora allocate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Choose a rank for every adapted module of a nested adapter, under a budget of adapter\n"
                    "parameters, to minimise the answer-token loss on a calibration set (held-out training data\n"
                    "by default). Each module may take a train rank or 0 (--grid all: any rank 0..R). The options\n"
                    "are scored (measured drops, or a Taylor estimate), allocated greedily along each module's\n"
                    "convex hull, then refined with measured loss. Each budget is written as a standard PEFT\n"
                    "adapter (rank_pattern) and a padded one-rank copy for engines that need one rank.",
        epilog="examples:\n"
               "  matryoshka-lora allocate runs/my-run --budget 0.25          # a quarter of the adapter's parameters\n"
               "  matryoshka-lora allocate runs/my-run --budgets 0.1,0.25,0.5 # a sweep (scored once)\n"
               "  matryoshka-lora allocate runs/my-run --budget 1.2M --grid all --score taylor\n"
               "  matryoshka-lora allocate runs/my-run --budget 0.25 --eval_limit 500   # scored on 500 test examples")
    p.add_argument("run_dir", help="a training run (or an svd output) folder")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", help="a share of the full adapter's parameters (0.25) or a count (1.2M)")
    budget.add_argument("--budgets", help="several budgets, comma-separated (0.1,0.25,0.5)")
    p.add_argument("--data", default=None, help="calibration data (default: the run's, held out from training)")
    p.add_argument("--split", default=None, help="its split (default: the run's data_split)")
    p.add_argument("--limit", type=int, default=32, help="calibration examples (default: %(default)s)")
    p.add_argument("--grid", default="train", choices=GRIDS,
                   help="ranks a module may take: 0 and the train ranks, or all of 0..R (default: %(default)s)")
    p.add_argument("--score", default="drop", choices=SCORES,
                   help="drop: each option's loss change measured (1 + modules x (grid - 1) forward passes of "
                        "the calibration set, stacked); taylor: a second-order estimate from one backward pass "
                        "(default: %(default)s)")
    p.add_argument("--refine", type=int, default=3, help="rounds of measured refinement (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=8, help="moves measured per round (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="calibration examples per batch (default: %(default)s)")
    p.add_argument("--eval_limit", type=int, default=64,
                   help="score the uniform ranks and the profiles on the first N examples of the run's eval split "
                        "(answer-token accuracy and loss; 0: skip) (default: %(default)s)")
    p.add_argument("--output_dir", default=None, help="where profiles go (default: RUN_DIR/profiles)")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise UserError(f"run folder {args.run_dir!r} not found")
    for name in ("limit", "refine", "candidates", "batch_size", "eval_limit"):
        low = 0 if name in ("refine", "eval_limit") else 1
        if getattr(args, name) < low:
            raise UserError(f"--{name} {getattr(args, name)} is not valid; give an integer >= {low}")
    budgets = [b.strip() for b in (args.budgets or args.budget).split(",") if b.strip()]
    summary = allocate_run(args.run_dir, budgets, args.data, args.split, args.limit, args.grid, args.score,
                           args.refine, args.candidates, args.seed, args.batch_size, output_dir=args.output_dir,
                           eval_limit=args.eval_limit)
    print(profiles_table(summary))
    out = os.path.dirname(summary["profiles"][0]["folder"])
    print(f"wrote {len(budgets)} profile(s) under {out}: rank_profile.json, adapter/ (PEFT, rank_pattern), "
          "padded/ (one rank, zero slices)" + ("; profiles.png" if args.eval_limit else ""))
    return 0
