"""Issue 16, item 2: training throughput with and without packing, through `train` itself.

Two short runs on the same data, model and batch size (rows per step), one with `packing: true`; printed for each:
the real (non-padding) tokens per second of training (`run_complete.json`: session tokens / Trainer runtime), the
examples per second, and how much of each batch was padding. A packed row holds several whole examples, so a step
of packed rows carries more real tokens; the question is how much of the time a padded batch spends on padding.

    python benchmarks/bench_packing.py --data ../shared/data/gsm8k            # local GSM8K JSONL (train split)
    python benchmarks/bench_packing.py --data openai/gsm8k --data_config main  # the hub copy
    python benchmarks/bench_packing.py --data arithmetic --max_length 256
"""
import argparse
import json
import os
import platform
import tempfile

import torch

from matryoshka_lora.training.config import TrainConfig
from matryoshka_lora.training.run import train


def run(args, packing: bool, out: str) -> dict:
    config = TrainConfig(model=args.model, data=args.data, data_config=args.data_config, max_length=args.max_length,
                         packing=packing, batch_size=args.batch_size, max_steps=args.steps, rank=args.rank,
                         max_examples=args.max_examples, save_steps=0, logging_steps=args.steps, warmup_steps=0,
                         output_dir=out, seed=0)
    train(config)
    summary = json.load(open(os.path.join(out, "run_complete.json")))
    rows = args.batch_size * args.steps
    examples = summary["examples"]
    per_row = examples["kept"] / examples.get("blocks", examples["kept"])
    return {"tokens_per_s": summary["session_tokens"] / summary["train_seconds"],
            "examples_per_s": rows * per_row / summary["train_seconds"],
            "seconds": summary["train_seconds"], "tokens": summary["session_tokens"], "examples_per_row": per_row}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="../shared/data/gsm8k")
    p.add_argument("--data_config", default=None)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4, help="rows per step, packed or not")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max_examples", type=int, default=512)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (False, True):
            results[packing] = run(args, packing, os.path.join(tmp, f"packing-{packing}"))
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; model {args.model}, data {args.data}, max_length {args.max_length}, "
          f"{args.batch_size} rows x {args.steps} steps, R {args.rank}, fp32")
    print("| packing | real tokens/s | examples/s | examples per row | real tokens | train s |")
    print("|---|---|---|---|---|---|")
    for packing, r in results.items():
        print(f"| {str(packing).lower()} | {r['tokens_per_s']:.0f} | {r['examples_per_s']:.2f} | "
              f"{r['examples_per_row']:.2f} | {r['tokens']} | {r['seconds']:.1f} |")
    print(f"packed / unpacked real tokens/s: {results[True]['tokens_per_s'] / results[False]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
