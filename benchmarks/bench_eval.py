"""Issue 5, target 2: evaluating every rank at the cost of one, and the speed of a decoding step.

A random-weight model built from a config, a matryoshka adapter with non-zero B, random prompt tokens, greedy
decoding of exactly ``--new`` tokens (no early stop: random weights rarely emit EOS, and a fixed length makes the
passes comparable). Printed, from one process with the passes interleaved:

  * one rank vs all ranks stacked in one batch vs all ranks one after another: wall time and ratio to one rank,
    and whether the stacked tokens equal the sequential ones;
  * the decoding step (ms per new token at the stacked batch) with the dynamic cache, the static cache, and the
    static cache with torch.compile (``--compile``), and with the adapter merged into the weights.

    python benchmarks/bench_eval.py                    # CPU: SmolLM2-135M shape, fp32, 8 prompts x 64 tokens, R 8
    python benchmarks/bench_eval.py --preset gpu --compile   # CUDA: Llama-3.2-1B shape, bf16, 32 prompts x 256, R 32
"""
import argparse
import contextlib
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, set_rank
from matryoshka_lora.evaluation.generate import at_ranks

from bench_train_step import SHAPES, TARGETS

PRESETS = {
    "cpu": dict(shape="smollm2-135m", device="cpu", dtype="float32", prompts=8, prompt_len=64, new=32, rank=8),
    "gpu": dict(shape="llama-3.2-1b", device="cuda", dtype="bfloat16", prompts=32, prompt_len=256, new=256, rank=32),
}


def build(opts):
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[opts["shape"]], max_position_embeddings=4096)
    dtype = getattr(torch, opts["dtype"])
    base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = get_matryoshka_model(base, MatryoshkaConfig(rank=opts["rank"], target_modules=TARGETS, scaling="sqrt", method="matryoshka"))
    with torch.no_grad():
        for layer in model.matryoshka.layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.02)  # a zero B would make every rank the same model
    return model.to(opts["device"]).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate(model, ids, group, new, cache=None):
    """Greedy tokens (K·b, new) for ``group`` ranks stacked rank-major over the b prompts ``ids``
    (``group=None``: the model as it is, e.g. merged)."""
    K, b = len(group or [0]), ids.shape[0]
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
                              pad_token_id=0, eos_token_id=None, cache_implementation=cache)
    stacked = ids.repeat(K, 1)
    with torch.no_grad(), at_ranks(model, group, b) if group else contextlib.nullcontext():
        out = model.generate(input_ids=stacked, attention_mask=torch.ones_like(stacked), generation_config=config)
    return out[:, ids.shape[1]:]


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for name in ("prompts", "prompt_len", "new", "rank"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the median is printed")
    p.add_argument("--compile", action="store_true", help="also time the static cache with torch.compile")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    opts = dict(PRESETS[args.preset])
    opts.update({k: v for k, v in vars(args).items() if k in opts and v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(opts["device"])
    model = build(opts)
    R = opts["rank"]
    ranks = [2 ** i for i in range(R.bit_length()) if 2 ** i <= R]
    ids = torch.randint(1, SHAPES[opts["shape"]]["vocab_size"], (opts["prompts"], opts["prompt_len"]), device=device)
    new = opts["new"]

    # 1. one rank vs stacked vs sequential
    jobs = {
        "one rank (R)": lambda: generate(model, ids, [R], new),
        f"{len(ranks)} ranks stacked": lambda: generate(model, ids, ranks, new),
        f"{len(ranks)} ranks one after another": lambda: [generate(model, ids, [k], new) for k in ranks],
    }
    times, outs = {k: [] for k in jobs}, {}
    for _ in range(args.repeats):
        for name, fn in jobs.items():
            t, outs[name] = timed(fn, device)
            times[name].append(t)
    same = torch.equal(outs[f"{len(ranks)} ranks stacked"], torch.cat(outs[f"{len(ranks)} ranks one after another"]))
    one = statistics.median(times["one rank (R)"])

    # 2. the decoding step at the stacked batch: (time for new tokens - time for 1 token) / (new - 1)
    steps = {"dynamic cache": dict(cache=None), "static cache": dict(cache="static")}
    if args.compile:
        steps["static cache + torch.compile"] = dict(cache="static", compile=True)
    steps["merged rank R, dynamic cache"] = dict(cache=None, merged=True)
    step_ms = {}
    for name, o in steps.items():
        if o.get("compile"):
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        if o.get("merged"):
            set_rank(model, R)
            model.merge_adapter()
        # the merged model runs the same batch size: every prompt once per rank, all at rank R
        group, x = (None, ids.repeat(len(ranks), 1)) if o.get("merged") else (ranks, ids)
        for n in (2, new):  # warm-up (compilation, cache allocation)
            generate(model, x, group, n, o["cache"])
        per = []
        for _ in range(args.repeats):
            t1, _ = timed(lambda: generate(model, x, group, 1, o["cache"]), device)
            tn, _ = timed(lambda: generate(model, x, group, new, o["cache"]), device)
            per.append((tn - t1) / (new - 1) * 1000)
        step_ms[name] = (len(ranks) * ids.shape[0], statistics.median(per))
        if o.get("merged"):
            model.unmerge_adapter()
            set_rank(model, None)

    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{opts['shape']} shape, random weights, {opts['dtype']}, {opts['prompts']} prompts x {opts['prompt_len']} "
          f"tokens, {new} new tokens (greedy), adapter R={R} on {', '.join(TARGETS)}, ranks {ranks}; median of "
          f"{args.repeats}; {where}\n")
    print("| evaluation | s | x one rank |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} | {statistics.median(t) / one:.2f} |")
    print(f"\nstacked tokens identical to one-after-another: {same}\n")
    print("| decoding step | batch | ms per token |\n|---|---|---|")
    for name, (batch, ms) in step_ms.items():
        print(f"| {name} | {batch} | {ms:.1f} |")


if __name__ == "__main__":
    main()
