"""Issue 17: what a rank costs at serving time, measured through vLLM's OpenAI-compatible server.

One run of this script starts three servers on the run's base model and sends the same stream of greedy requests
(``--requests`` prompts, ``--concurrency`` in flight, ``--max_tokens`` new tokens each, EOS ignored so every request
decodes the same length) to each condition:

- server 1 (``serve``'s own arguments, one adapter slot per rank): the base alone, each rank alone, and a stream
  that mixes the ranks (request i asks for rank i mod |ranks|);
- server 2 (``--max-loras 1``): the same mixed stream, where the engine must swap adapters;
- server 3: the largest rank merged into the base (``export --merge``), served as a plain model;
- server 4 (``serve --one_slot``): the mixed stream with every rank in one shared adapter slot (this project's vLLM
  plugin), and the bytes of the LoRA A/B buffers the engine allocated, against one slot per rank.

Printed: output tokens/s, mean and p90 request latency, each as a ratio to the base alone; written to --output as
JSON. Presets: ``cpu`` (the embedded SmolLM2-135M, 2 cores) and ``gpu`` (more requests and concurrency, for a
device session). The adapter weights do not change the cost, so a run with random weights measures the same.

    python benchmarks/bench_serve.py --run runs/smollm2-arithmetic --python .venv-vllm/bin/python
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from matryoshka_lora.adapter_io import export_rank, load_run
from matryoshka_lora.bundle import lora_name
from matryoshka_lora.serving import EngineServer, complete, engine_command, engine_env, engine_python, free_port, \
    run_base, serve_run
from matryoshka_lora.vllm_one_slot import read_report

PRESETS = {"cpu": dict(requests=32, concurrency=8, max_tokens=64), "gpu": dict(requests=512, concurrency=64,
                                                                              max_tokens=128)}
PROMPT = "Question: A farmer has {n} sheep and buys {m} more. Then half of them run away. How many are left?\nAnswer:"


def stream(url: str, models: list[str], args) -> dict:
    """Send the request stream (request i to models[i % len(models)]); throughput and latencies."""
    def one(i):
        start = time.perf_counter()
        choice = complete(url, models[i % len(models)], PROMPT.format(n=10 + i, m=i % 7 + 1), args.max_tokens,
                          ignore_eos=True)
        return time.perf_counter() - start, len(choice.get("token_ids") or []) or args.max_tokens

    complete(url, models[0], "warm up", 4)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        done = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - start
    latencies = sorted(d for d, _ in done)
    return {"tokens_per_s": sum(n for _, n in done) / wall, "latency_mean_s": statistics.mean(latencies),
            "latency_p90_s": latencies[int(0.9 * (len(latencies) - 1))], "wall_s": wall}


def measure_serve(args, results: dict) -> dict:
    server, manifest = serve_run(args.run, args.ranks, python=args.python, port=0, out_dir=args.export_dir)
    name, ranks = manifest["name"], [r["rank"] for r in manifest["ranks"]]
    with server:
        results["base"] = stream(server.url, [name], args)
        for k in ranks:
            results[f"rank {k}"] = stream(server.url, [lora_name(name, k)], args)
        results[f"mixed, {len(ranks)} slots"] = stream(server.url, [lora_name(name, k) for k in ranks], args)
    return manifest


def measure_swapping(args, manifest: dict, results: dict, base: str) -> None:
    """The mixed stream with one adapter slot: the engine swaps adapters between requests."""
    lora_args = list(manifest["vllm"]["args"])
    lora_args[lora_args.index("--max-loras") + 1] = "1"
    port = free_port()
    command = engine_command(args.python, base, manifest["name"], lora_args, "127.0.0.1", port, "float32")
    with EngineServer(command, f"http://127.0.0.1:{port}", os.path.join(args.export_dir, "vllm-swap.log"),
                      engine_env()) as server:
        ranks = [r["rank"] for r in manifest["ranks"]]
        results["mixed, 1 slot"] = stream(server.url, [lora_name(manifest["name"], k) for k in ranks], args)


def measure_one_slot(args, results: dict) -> dict:
    """The mixed stream through ``serve --one_slot``; {"one slot", "one slot per rank"}: LoRA buffer bytes, from the
    plugin's line in the engine log (what it allocated, and N times that: vLLM's own layout)."""
    server, manifest = serve_run(args.run, args.ranks, python=args.python, port=0, out_dir=args.export_dir,
                                 one_slot=True)
    ranks = [r["rank"] for r in manifest["ranks"]]
    with server:
        results["mixed, 1 shared slot (--one_slot)"] = stream(server.url, [lora_name(manifest["name"], k)
                                                                          for k in ranks], args)
    with open(server.log_path) as f:
        found = read_report(f.read())
    return {"one slot": found["bytes"], "one slot per rank": found["bytes_one_slot_per_id"]} if found else {}


def measure_merged(args, manifest: dict, results: dict) -> None:
    k = manifest["ranks"][-1]["rank"]
    merged = os.path.join(args.export_dir, f"merged-rank-{k}")
    if not os.path.isfile(os.path.join(merged, "config.json")):
        model, tokenizer, _ = load_run(args.run, quantization="none")
        export_rank(model, k, merged, merge=True)
        tokenizer.save_pretrained(merged)
    port = free_port()
    command = engine_command(args.python, merged, "merged", [], "127.0.0.1", port, "float32")
    with EngineServer(command, f"http://127.0.0.1:{port}", os.path.join(args.export_dir, "vllm-merged.log"),
                      engine_env()) as server:
        results[f"rank {k} merged"] = stream(server.url, ["merged"], args)


def table(results: dict) -> str:
    base = results["base"]
    rows = ["| condition | output tokens/s | × base | mean latency (s) | × base | p90 latency (s) |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
                    f"{r['latency_mean_s']:.2f} | {r['latency_mean_s'] / base['latency_mean_s']:.2f} | "
                    f"{r['latency_p90_s']:.2f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (its ranks are served)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default: the run's train ranks)")
    p.add_argument("--python", default=None, help="the interpreter that has vLLM")
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--max_tokens", type=int, default=None)
    p.add_argument("--output", default="runs/bench_serve.json")
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        setattr(args, key, getattr(args, key) or value)
    args.ranks = [int(k) for k in args.ranks.split(",")] if args.ranks else None
    args.python = engine_python(args.python)
    args.export_dir = os.path.join(args.run, "export")
    results = {}
    manifest = measure_serve(args, results)
    base = run_base(args.run, "float32")
    measure_swapping(args, manifest, results, base)
    measure_merged(args, manifest, results)
    lora_bytes = measure_one_slot(args, results)
    version = subprocess.run([args.python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    about = (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, vLLM {version}, "
             f"{args.run} ({manifest['base_model']}, {manifest['method']} R={manifest['max_rank']}), "
             f"{args.requests} requests, concurrency {args.concurrency}, {args.max_tokens} tokens each, fp32")
    print(about)
    print(table(results))
    if lora_bytes:
        print(f"LoRA A/B buffers of the linear layers: {lora_bytes['one slot'] / 2**20:.1f} MiB with --one_slot, "
              f"{lora_bytes['one slot per rank'] / 2**20:.1f} MiB with one slot per rank ({len(manifest['ranks'])})")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"about": about, "results": results, "lora_buffer_bytes": lora_bytes, "args": vars(args)}, f,
                  indent=1)


if __name__ == "__main__":
    main()
