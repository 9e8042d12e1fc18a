"""`matryoshka-lora export RUN_DIR`: write ranks of a run as standard PEFT LoRA adapters or merged models."""
import argparse
import os

from ..adapter_io import export_rank, load_run
from ..bundle import DEFAULT_TOLERANCE, MANIFEST, export_bundle
from ..config import INFERENCES, MatryoshkaConfig
from ..errors import ArgumentParser, UserError
from .args import parse_ranks


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora export",
        description="Write chosen ranks of a trained nested adapter as standard PEFT LoRA adapters "
                    "(r == lora_alpha == k, loadable by PeftModel.from_pretrained, vLLM, TGI, lm-eval) "
                    "or, with --merge, as full models with the rank-k adapter merged into the weights.")
    p.add_argument("run_dir", help="a folder written by `matryoshka-lora train` (or any save_pretrained of a "
                                   "matryoshka model)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks, e.g. 1,4,16 (default: the train ranks)")
    p.add_argument("--output_dir", default=None, help="where to write rank-K/ folders (default: RUN_DIR/export)")
    p.add_argument("--merge", action="store_true", help="write merged full models instead of adapters "
                                                        "(loads the run's base model)")
    p.add_argument("--bundle", action="store_true",
                   help=f"also write {MANIFEST}: base model, method, parameters and bytes per rank, the run's "
                        "evaluation per rank and AURAC (when evaluated), a recommended rank and the vLLM arguments "
                        "that serve them (what `matryoshka-lora serve` reads)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="--bundle: recommend the smallest rank whose score is within this of the best rank's "
                        "(metric on its 0-1 scale; default: %(default)s)")
    p.add_argument("--inference", default=None, choices=INFERENCES,
                   help="read the weights as rank k = s_k·A_k B_k (paper) or as the truncation of the trained "
                        "function (prefix; matryoshka and lora runs) instead of the run's own rule")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise UserError(f"run folder {args.run_dir!r} not found")
    config = MatryoshkaConfig.load(args.run_dir).read_as(args.inference)
    ranks = parse_ranks(args.ranks) or config.train_ranks
    bad = [k for k in ranks if not 1 <= k <= config.rank]
    if bad:
        raise UserError(f"--ranks {bad} outside 1..{config.rank} (the run's maximum rank)")
    out = args.output_dir or os.path.join(args.run_dir, "export")
    if args.bundle:
        return _bundle(args, ranks, out)
    source = args.run_dir
    if args.merge:
        source = load_run(args.run_dir, quantization="none")[0]  # merged into the full-precision base
    for k in ranks:
        path = export_rank(source, k, os.path.join(out, f"rank-{k}"), merge=args.merge, inference=args.inference)
        print(f"rank {k}: {path}")
    what = "merged model" if args.merge else "PEFT adapter"
    print(f"wrote {len(ranks)} {what}(s) under {out}")
    return 0


def _bundle(args, ranks, out) -> int:
    if args.merge or args.inference:
        raise UserError("--bundle writes the run's adapters under its own rule; leave out --merge and --inference")
    manifest = export_bundle(args.run_dir, ranks, out, tolerance=args.tolerance)
    for row in manifest["ranks"]:
        score = "" if row["score"] is None else f", score {row['score']:.4f}"
        print(f"rank {row['rank']}: {os.path.join(out, row['path'])} ({row['params']:,} parameters, "
              f"{row['bytes'] / 2**20:.1f} MiB{score})")
    print(f"recommended: {manifest['recommendation']}")
    print(f"wrote {len(manifest['ranks'])} PEFT adapter(s) and {os.path.join(out, MANIFEST)}")
    return 0
