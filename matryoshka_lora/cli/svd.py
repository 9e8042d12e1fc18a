"""`matryoshka-lora svd ADAPTER_DIR`: give a plain LoRA adapter nested ranks (see ``matryoshka_lora.svd``)."""
import argparse
import os

from ..adapter_io import read_weights
from ..config import MatryoshkaConfig
from ..errors import ArgumentParser, UserError
from ..rundir import TRAIN_CONFIG
from ..svd import energy_captured, svd_adapter
from .args import parse_ranks


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora svd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Give a trained plain LoRA adapter nested ranks: re-factor each layer's ΔW by its SVD, so\n"
                    "that the first k components are its best rank-k approximation (Eckart-Young). The result is\n"
                    "a nested adapter folder like a training run's: evaluate and export any rank k <= r.",
        epilog="examples:\n"
               "  matryoshka-lora svd runs/my-lora-run                       # a run trained with --method lora\n"
               "  matryoshka-lora eval runs/my-lora-run-svd                  # accuracy at every rank\n"
               "  matryoshka-lora svd path/to/peft-adapter --output_dir nested   # any PEFT LoRA adapter\n"
               "  matryoshka-lora export nested --ranks 4,16                 # ranks as standard PEFT adapters")
    p.add_argument("adapter_dir", help="a matryoshka-lora run trained with method lora, or a PEFT LoRA adapter "
                                       "folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output_dir", default=None, help="where to write the nested adapter (default: ADAPTER_DIR-svd)")
    p.add_argument("--ranks", default=None, help="the ranks listed as the adapter's own, e.g. 1,2,4,8 (the default "
                                                 "ranks of eval and export; default: the run's, or powers of two)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    src = args.adapter_dir
    if not os.path.isdir(src):
        raise UserError(f"adapter folder {src!r} not found")
    out = args.output_dir or os.path.normpath(src) + "-svd"
    if os.path.abspath(out) == os.path.abspath(src):
        raise UserError(f"--output_dir {out!r} is the adapter folder itself; choose another folder")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UserError(f"--output_dir {out!r} already exists; add --overwrite to replace it, or choose another")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out!r} is a file; choose a folder")
    svd_adapter(src, out, parse_ranks(args.ranks), keep_run_files=True)
    config = MatryoshkaConfig.load(out)
    shares = energy_captured(read_weights(out), config.train_ranks)
    print(f"wrote the nested adapter (R = {config.rank}) to {out}\n\nshare of ‖ΔW‖² kept at each rank "
          "(mean over layers):\n")
    print("| rank | " + " | ".join(map(str, config.train_ranks)) + " |\n|" + "---|" * (len(shares) + 1))
    print("| kept | " + " | ".join(f"{100 * x:.1f}%" for x in shares) + " |\n")
    is_run = os.path.isfile(os.path.join(out, TRAIN_CONFIG))
    print(f"next: matryoshka-lora eval {out}    (accuracy at every rank)\n      " if is_run else "next: ", end="")
    print(f"matryoshka-lora export {out} --ranks {','.join(map(str, config.train_ranks[:2]))}  (standard PEFT adapters)")
    return 0
