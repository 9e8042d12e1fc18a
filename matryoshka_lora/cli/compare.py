"""`matryoshka-lora compare CONFIG.yaml`: train every method with the same config and seeds, evaluate all at the
same ranks, and write one side-by-side table and plot (``matryoshka_lora.compare``)."""
import argparse
import os

from ..compare import ALL_METHODS, DEFAULT_METHODS, DEFAULT_SEEDS, compare, parse_methods, parse_seeds
from ..errors import ArgumentParser, UserError
from ..training.config import unknown_key_problem
from .args import parse_ranks
from .train import parser as train_parser

EVAL_OPTIONS = ("task", "ranks", "shots", "limit", "batch_size", "max_new_tokens", "score_only", "engine",
                "engine_python")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora compare",
        description="Train each method with the same config and seeds, evaluate all at the same ranks, and write "
                    "one side-by-side table (per-rank values, AURAC, log-AURAC, mean over seeds) and one plot. "
                    "Any train config key may follow as --key value (see matryoshka-lora train --help).",
        epilog="example: matryoshka-lora compare configs/smollm2-arithmetic.yaml --seeds 0 "
               "--methods matryoshka,lora,lora-svd --max_steps 60 --limit 40")
    p.add_argument("config", nargs="?", help="train YAML shared by every run (default: the train defaults)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma-separated seeds (default: {DEFAULT_SEEDS}, the paper's)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(ALL_METHODS)} (default: {DEFAULT_METHODS})")
    p.add_argument("--output_dir", default=None, help="default: runs/compare-<config name>")
    p.add_argument("--task", default=None, help="eval task (default: the config's data): gsm8k, arithmetic, a JSONL "
                                                "file or lm-eval:<task>")
    p.add_argument("--ranks", default=None, help="eval ranks, e.g. 1,2,4,8 (default: the train ranks)")
    p.add_argument("--shots", type=int, default=None, help="few-shot exemplars per eval prompt (default 0)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test examples (default: all)")
    p.add_argument("--eval_batch_size", dest="batch_size", type=int, default=16, help="prompts per eval batch")
    p.add_argument("--max_new_tokens", type=int, default=256, help="generation budget per answer")
    p.add_argument("--score_only", action="store_true",
                   help="evaluate by teacher-forced metrics alone (token_acc, loss; acc for multiple choice), without "
                        "generation: several times faster, no exact match; into RUN_DIR/eval-score")
    p.add_argument("--engine", choices=("vllm",), default=None,
                   help="evaluate every run through vLLM's OpenAI-compatible server (started per run and stopped "
                        "after, as `eval --engine vllm`); results go to RUN_DIR/eval-vllm")
    p.add_argument("--python", dest="engine_python", default=None,
                   help="--engine: the interpreter that has vLLM (default: $MATRYOSHKA_LORA_VLLM_PYTHON, else this one)")
    p.add_argument("--metric", default=None,
                   help="the per-rank metric tabulated (default: the task's primary). Built-in tasks: "
                        "exact_match_strict, exact_match_flexible (gsm8k), exact_match (completion), acc, acc_norm "
                        "(choice), token_acc (all: teacher-forced accuracy of the answer tokens); lm-eval tasks: "
                        "their metric key, e.g. acc_norm,none")
    return p


def split_train_overrides(rest: list[str]) -> dict:
    """The ``--key value`` train overrides among the arguments compare does not know itself."""
    args, unknown = train_parser().parse_known_args(rest)
    if unknown:
        bad = [u for u in unknown if u.startswith("-")] or unknown
        key = bad[0].lstrip("-").split("=", 1)[0]
        raise UserError(unknown_key_problem(key) if bad[0].startswith("--")
                        else f"unexpected argument {bad[0]!r}")
    if args.config:
        raise UserError(f"unexpected argument {args.config!r} (one CONFIG.yaml at most; values follow their --key)")
    return {k: v for k, v in vars(args).items() if k != "config"}


def split_argv(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(this command's arguments, the train ``--key value`` overrides), so that a train value is never taken
    for the positional CONFIG."""
    own = {o for a in parser._actions for o in a.option_strings}
    mine, train = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token == "-":
            mine.append(token)
            i += 1
            continue
        takes_value = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        group = mine if token.split("=", 1)[0] in own else train
        group += argv[i:i + 1 + takes_value]
        i += 1 + takes_value
    return mine, train


def main(argv) -> int:
    parser = build_parser()
    mine, rest = split_argv(list(argv), parser)
    args = parser.parse_args(mine)
    overrides = split_train_overrides(rest)
    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else "defaults"
    output_dir = args.output_dir or os.path.join("runs", f"compare-{stem}")
    eval_options = {k: getattr(args, k) for k in EVAL_OPTIONS if getattr(args, k) is not None}
    if "ranks" in eval_options:
        eval_options["ranks"] = parse_ranks(eval_options["ranks"])
    compare(args.config, methods, seeds, output_dir, overrides, eval_options, args.metric)
    return 0
