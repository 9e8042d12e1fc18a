"""`matryoshka-lora train CONFIG.yaml [--key value ...]`: fine-tune a causal LM with a nested-rank LoRA adapter."""
import argparse
import dataclasses
import os

from ..errors import ArgumentParser, UserError
from ..files import read_yaml
from ..rundir import TRAIN_CONFIG
from ..training.config import (ADAPTER_FIELDS, WHAT_TO_TRAIN, TrainConfig, build_config, default_output_dir,
                               unknown_key_problem)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora train",
        description="Fine-tune a causal LM with a nested-rank LoRA adapter: by default plain LoRA re-factored by SVD "
                    "at the end (lora-svd), or a nested objective (dylora, matryoshka, ...; see --method). Values "
                    "come from CONFIG.yaml, then from --key value overrides.",
        epilog="example: matryoshka-lora train configs/smollm2-arithmetic.yaml --rank 16 --max_steps 50",
        formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True, allow_abbrev=False)
    p.add_argument("config", nargs="?", help="YAML file of config keys (optional: defaults train the embedded "
                   "SmolLM2 on arithmetic)")
    what = p.add_argument_group("what to train")
    adapter = p.add_argument_group("the adapter (MatryoshkaConfig)")
    run = p.add_argument_group("the run")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in TrainConfig().to_dict():
        _add_key(what if name in WHAT_TO_TRAIN else adapter if name in ADAPTER_FIELDS else run, fields[name])
    return p


def _add_key(group, f) -> None:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    shown = "none" if default is None else default
    kind = f.metadata["kind"]
    if kind in ("bool", "fsdp"):  # --flag alone means true
        group.add_argument(f"--{f.name}", nargs="?", const="true", default=argparse.SUPPRESS,
                           metavar="BOOL" if kind == "bool" else "BOOL|OPTIONS",
                           help=f"{f.metadata['help']} (default: {str(shown).lower() or 'false'})")
    else:
        group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=kind.rstrip("?").upper(),
                           help=f"{f.metadata['help']} (default: {shown})")


def _unknown_problems(unknown: list[str]) -> list[str]:
    problems = []
    for i, token in enumerate(unknown):
        if token.startswith("--"):
            problems.append(unknown_key_problem(token[2:].split("=", 1)[0]))
        elif i > 0 and unknown[i - 1].startswith("--") and "=" not in unknown[i - 1]:
            continue  # the value of the unknown key just reported
        elif token.startswith("-"):
            problems.append(f"unknown option {token!r}")
        else:
            problems.append(f"unexpected argument {token!r} (one CONFIG.yaml at most; values follow their --key)")
    return problems


def parse_args(argv) -> TrainConfig:
    """The config of a command line. Raises: UserError for every problem (unknown options included)."""
    args, unknown = parser().parse_known_args(argv)
    problems = _unknown_problems(unknown)
    if problems:
        raise UserError("; ".join(problems))
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    file_values = {}
    if args.config:
        file_values = read_yaml(args.config)
    elif cli.get("resume") not in (None, "false", "no", "0") and cli.get("output_dir"):
        saved = os.path.join(cli["output_dir"], TRAIN_CONFIG)
        if os.path.isfile(saved):  # --resume --output_dir RUN alone continues that run as it was
            file_values = {k: v for k, v in read_yaml(saved).items() if k != "model_path"}
    config = build_config(file_values, cli, source=args.config or "command line")
    config.output_dir = config.output_dir or default_output_dir(config, args.config)
    return config


def main(argv) -> int:
    config = parse_args(argv)
    from ..training.run import train  # transformers, PEFT and the Trainer load only once the config is valid

    train(config)
    end_processes()
    return 0


def end_processes() -> None:
    """In a multi-process run, every process waits for the main one's final save, then tears the process group
    down itself: left to the interpreter's exit, the gloo teardown (under DeepSpeed) now and then aborts a process
    whose work is done (``terminate called without an active exception``) and fails a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
