"""`matryoshka-lora COMMAND ...`: dispatch to the command modules, each owning its own arguments.

User mistakes (UserError, ValueError from config checks, missing files) print one line on stderr and
exit 2, without a traceback.
"""
import difflib
import importlib
import logging
import sys

from .. import __version__
from ..errors import AdapterFileError, InvalidInput, TrainingStopped, UserError

# Command modules are imported only when run, so `matryoshka-lora --help` loads no torch.
COMMANDS = {
    "train": ("matryoshka_lora.cli.train", "fine-tune a causal LM with nested-rank LoRA from a YAML config"),
    "eval": ("matryoshka_lora.cli.eval", "evaluate a run at every rank: accuracy curve, AURAC, plot"),
    "compare": ("matryoshka_lora.cli.compare", "train and evaluate several methods and seeds side by side"),
    "demo": ("matryoshka_lora.cli.demo", "the offline demo on the embedded SmolLM2-135M-Instruct"),
    "export": ("matryoshka_lora.cli.export", "write ranks of a run as standard PEFT adapters (or merged models)"),
    "svd": ("matryoshka_lora.cli.svd", "give a plain LoRA adapter (a run or any PEFT adapter) nested ranks by SVD"),
    "allocate": ("matryoshka_lora.cli.allocate", "choose a rank per layer under a parameter budget (profiles)"),
    "serve": ("matryoshka_lora.cli.serve", "serve every chosen rank of a run on vLLM's OpenAI-compatible server"),
}

USAGE = "usage: matryoshka-lora COMMAND [options]   (matryoshka-lora COMMAND --help for its options)\n\ncommands:\n" + \
    "\n".join(f"  {name:<10}{about}" for name, (_, about) in COMMANDS.items())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"matryoshka-lora: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    # bitsandbytes >= 0.50 on a CPU with AVX512-BF16, imported by peft, tries to fetch an optional 4-bit kernel
    # from the hub through `kernels`; failing or offline, bitsandbytes falls back to its own kernel, and both
    # libraries warn about it on every command, quantizing or not
    for noisy in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    module = importlib.import_module(COMMANDS[name][0])
    return run_guarded(module.main, rest, prog=f"matryoshka-lora {name}")


def run_guarded(fn, argv, prog: str) -> int:
    """Run a command; user errors become one stderr line and exit code 2."""
    try:
        return int(fn(argv) or 0)
    except TrainingStopped as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    except (UserError, InvalidInput, AdapterFileError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
