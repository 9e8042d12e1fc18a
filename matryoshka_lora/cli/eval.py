"""`matryoshka-lora eval RUN_DIR`: evaluate a run at every rank and at rank 0 (the base model, adapter off)."""
import argparse
import dataclasses
import os

from ..base_models import QUANTIZATIONS
from ..config import INFERENCES
from ..errors import ArgumentParser
from ..evaluation import EvalSpec, evaluate_run
from ..evaluation.profile_eval import evaluate_profiles, profiles_eval_table
from ..report import markdown_table
from .args import parse_ranks, unescape

DEFAULT = EvalSpec()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a trained run at every rank and at rank 0 (the base model, adapter off): "
                    "accuracy per rank, AURAC and log-AURAC, teacher-forced loss/perplexity, a Markdown table "
                    "in the paper's layout and a rank curve. All ranks run in one stacked pass by default.",
        epilog="tasks:\n"
               "  gsm8k, arithmetic      generation with lm-eval's gsm8k prompt; exact match strict (primary)\n"
               "                         and flexible, as lm-eval's two filters\n"
               "  FILE.jsonl / FOLDER    question/answer rows (as gsm8k), prompt/completion rows (exact match),\n"
               "                         or choices+label rows (multiple choice: acc, acc_norm)\n"
               "  lm-eval:TASK           lm-evaluation-harness on the model at each rank (arc_challenge,\n"
               "                         hellaswag, gsm8k, ... or your YAML via --include_path)\n\n"
               "outputs in --output_dir: eval.json, eval.md, rank_curve.png, ranks/rank-K.json (finished ranks\n"
               "are reused when rerun with the same settings, so an interrupted run resumes)\n\n"
               "examples:\n  matryoshka-lora eval runs/gsm8k --task /data/gsm8k --shots 8 --limit 200 --ranks 1,2,4,8\n"
               "  matryoshka-lora eval runs/gsm8k --profiles --limit 200   # the ranks and `allocate`'s profiles")
    p.add_argument("run_dir", help="a folder written by `matryoshka-lora train`")
    p.add_argument("--task", default=None, help="gsm8k, arithmetic, a JSONL file or folder, or lm-eval:TASK "
                                                "(default: the run's training data, test split)")
    p.add_argument("--ranks", default=None,
                   help="comma-separated ranks, e.g. 1,2,4,8 (default: the run's train ranks)")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot exemplars from the train split (default: 0; for lm-eval:TASK the task's own)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test examples")
    p.add_argument("--batch_size", type=int, default=DEFAULT.batch_size,
                   help="prompts per batch; a stacked batch runs this many prompts at every rank "
                        "(default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT.max_new_tokens,
                   help="generation budget per prompt (default: %(default)s, lm-eval's)")
    p.add_argument("--output_dir", default=None, help="where results go (default: RUN_DIR/eval)")
    p.add_argument("--sequential", action="store_true",
                   help="evaluate one rank after another instead of stacking all ranks in one pass (same results)")
    p.add_argument("--fewshot_data", default=None, help="file or folder of exemplars (default: the task's train split)")
    p.add_argument("--fewshot_seed", type=int, default=DEFAULT.fewshot_seed,
                   help="seed of the exemplar draw (default: %(default)s, lm-eval's)")
    p.add_argument("--dtype", default=DEFAULT.dtype, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, help="load the base quantized (bitsandbytes; default: as trained)")
    p.add_argument("--attn_implementation", default=DEFAULT.attn_implementation,
                   help="attention kernel: eager (default; stacked results are bitwise those of --sequential on "
                        "CPU), sdpa, or model for the model's own")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="an extra stop string (repeatable; \\n and \\t are read as escapes, e.g. --stop '\\n\\n'); gsm8k "
                        "stops at lm-eval's Question:, </s>, <|im_end|> and EOS")
    p.add_argument("--include_path", default=None, help="folder of custom lm-eval task YAMLs (lm-eval:TASK only)")
    p.add_argument("--metric", default=None,
                   help="primary metric of an lm-eval task, e.g. acc,none (default: the first present of "
                        "exact_match,strict-match, acc_norm,none, acc,none, exact_match,none)")
    p.add_argument("--inference", default=None, choices=INFERENCES,
                   help="read the weights as rank k = s_k·A_k B_k (paper) or as the truncation of the trained "
                        "function (prefix; matryoshka and lora runs) instead of the run's own rule; results go to "
                        "RUN_DIR/eval-<rule>")
    p.add_argument("--score_only", action="store_true",
                   help="teacher-forced metrics alone (token_acc, loss, ppl; acc/acc_norm of choice tasks), no "
                        "generation and so no exact match: several times faster, for sweeps; results go to "
                        "RUN_DIR/eval-score (not lm-eval:TASK)")
    p.add_argument("--profiles", nargs="?", const="", default=None, metavar="DIR",
                   help="also evaluate the per-layer rank profiles `matryoshka-lora allocate` wrote to DIR (default: "
                        "RUN_DIR/profiles), on the same task and settings: profiles_eval.md and params_curve.png "
                        "(the metric against adapter parameters, uniform ranks and profiles on one axis)")
    _engine_options(p)
    return p


def _engine_options(p) -> None:
    """--engine, --engine_url, --python (evaluation through vLLM), then --no_progress."""
    p.add_argument("--engine", choices=("vllm",), default=None,
                   help="evaluate through vLLM's OpenAI-compatible server (as `serve` runs it, started for the run "
                        "and stopped after): the same prompts and scores, the engine's speed; built-in tasks, and "
                        "lm-eval:TASK through lm-eval's local-completions model; results go to RUN_DIR/eval-vllm")
    p.add_argument("--engine_url", default=None, help="evaluate on a running `matryoshka-lora serve` of this run, "
                                                      "e.g. http://127.0.0.1:8000 (implies --engine vllm)")
    p.add_argument("--python", dest="engine_python", default=None,
                   help="--engine: the interpreter that has vLLM (default: $MATRYOSHKA_LORA_VLLM_PYTHON, else this one)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")


def spec_of(args) -> EvalSpec:
    """The EvalSpec of parsed arguments: options named as its fields pass as they are, the others are converted."""
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSpec) if hasattr(args, f.name)}
    return EvalSpec(**same | dict(
        ranks=parse_ranks(args.ranks), stacked=not args.sequential, progress=not args.no_progress,
        attn_implementation=None if args.attn_implementation == "model" else args.attn_implementation,
        stop=[unescape(t) for t in args.stop]))


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.profiles is not None:
        summary = evaluate_profiles(args.run_dir, args.profiles or None, spec_of(args))
        print(profiles_eval_table(summary))
        out = args.output_dir or os.path.relpath(summary["output_dir"])
        print(f"wrote {out}/profiles_eval.json, profiles_eval.md, params_curve.png (and the ranks' eval.json)")
        return 0
    result = evaluate_run(args.run_dir, spec_of(args))
    out = args.output_dir or os.path.relpath(result["output_dir"])
    print(markdown_table(result).split("\n\n")[2])
    print(f"wrote {out}/eval.json, eval.md, rank_curve.png")
    return 0
