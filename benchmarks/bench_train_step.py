"""Issue 5, target 1 and 3: one training step of each method against the hardware floor and stock PEFT.

Every variant is a copy of one random-weight model built from a config; one timed step is forward, backward,
AdamW step and zero_grad, and the variants take turns step by step (interleaved), so drift in the machine's
speed hits all of them alike. Printed: median ms per step, the ratio to the floor (frozen base, forward and
activation backward, no adapters) and to stock PEFT, and on CUDA the peak memory a step adds.

    python benchmarks/bench_train_step.py                     # CPU: SmolLM2-135M shape, fp32, batch 4 x 128, R 8
    python benchmarks/bench_train_step.py --preset gpu        # CUDA: Llama-3.2-1B shape, bf16, batch 4 x 2048, R 32
"""
import argparse
import copy
import platform
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, sample_rank, set_fused, set_rank

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    # SmolLM2-135M-Instruct, the demo model
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Llama-3.2-1B
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}
PRESETS = {
    "cpu": dict(shape="smollm2-135m", device="cpu", dtype="float32", batch=4, seq=128, rank=8, steps=5),
    "gpu": dict(shape="llama-3.2-1b", device="cuda", dtype="bfloat16", batch=4, seq=2048, rank=32, steps=15),
}


def build_base(shape: str, dtype, device):
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)


def variants(base, rank: int, dtype, batch: int, with_reference: bool) -> dict:
    """name -> (model, params to optimise, what to call before each step)."""
    out = {}
    floor = copy.deepcopy(base).requires_grad_(False)
    out["floor: frozen base, activation backward"] = (floor, [], None)
    for name, cast in [("stock PEFT LoRA (fp32 adapters)", False), ("stock PEFT LoRA, adapters in bf16", True)]:
        if cast and dtype == torch.float32:
            continue  # the same as the line above when the base is fp32
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
        if cast:
            m.to(dtype)
        out[name] = (m, [p for p in m.parameters() if p.requires_grad], None)
    full = copy.deepcopy(base).requires_grad_(True)
    out["full fine-tuning"] = (full, list(full.parameters()), None)
    for method in ("matryoshka", "lora", "dylora"):
        m = get_matryoshka_model(copy.deepcopy(base), MatryoshkaConfig(rank=rank, method=method, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(0)
        out[f"matryoshka-lora, method {method}"] = (m, [p for p in m.parameters() if p.requires_grad],
                                                    lambda m=m, gen=gen: sample_rank(m, gen))
    mixed = get_matryoshka_model(copy.deepcopy(base), MatryoshkaConfig(rank=rank, target_modules=TARGETS, method="matryoshka"))
    ks = torch.tensor([[1, 2, 4, rank][i % 4] for i in range(batch)])
    set_rank(mixed, ks)
    out["matryoshka-lora, per-example ranks (mixed batch)"] = (mixed, [p for p in mixed.parameters() if p.requires_grad], None)
    if with_reference:
        ref = get_matryoshka_model(copy.deepcopy(base), MatryoshkaConfig(rank=rank, target_modules=TARGETS, method="matryoshka"))
        set_fused(ref, False)
        out["matryoshka-lora, reference path (PEFT forward + gate hook)"] = (
            ref, [p for p in ref.parameters() if p.requires_grad], None)
    return out


def one_step(model, params, opt, before, ids, device):
    if before:
        before()
    if params:
        out = model(input_ids=ids, labels=ids)
    else:  # the floor: gradients of the activations only, through every layer
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES))
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    for name in ("batch", "seq", "rank", "steps"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no_reference", action="store_true", help="skip the reference-path variant")
    args = p.parse_args()
    opts = dict(PRESETS[args.preset])
    opts.update({k: v for k, v in vars(args).items() if k in opts and v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(opts["device"]), getattr(torch, opts["dtype"])
    base = build_base(opts["shape"], dtype, device)
    runs = variants(base, opts["rank"], dtype, opts["batch"], not args.no_reference)
    del base
    opts_ = {name: torch.optim.AdamW(params, lr=1e-5) if params else None for name, (_, params, _) in runs.items()}
    ids = torch.randint(0, SHAPES[opts["shape"]]["vocab_size"], (opts["batch"], opts["seq"]), device=device)
    times = {name: [] for name in runs}
    peak = {}
    for i in range(args.warmup + opts["steps"]):
        for name, (model, params, before) in runs.items():
            if device.type == "cuda":
                sync(device)
                torch.cuda.reset_peak_memory_stats()
                start_mem = torch.cuda.memory_allocated()
            sync(device)
            t = time.perf_counter()
            one_step(model, params, opts_[name], before, ids, device)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() - start_mem)
    med = {name: statistics.median(t) * 1000 for name, t in times.items()}
    floor = next(v for k, v in med.items() if k.startswith("floor"))
    peft = next(v for k, v in med.items() if k.startswith("stock PEFT"))
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{opts['shape']} shape, random weights, {opts['dtype']}, batch {opts['batch']} x {opts['seq']} tokens, "
          f"rank {opts['rank']} on {', '.join(TARGETS)}, AdamW; median of {opts['steps']} interleaved steps; {where}\n")
    header = "| step | ms | x floor | x stock PEFT |" + (" peak added GiB |" if peak else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, ms in med.items():
        row = f"| {name} | {ms:.0f} | {ms / floor:.2f} | {ms / peft:.2f} |"
        if peak:
            row += f" {peak[name] / 2 ** 30:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
