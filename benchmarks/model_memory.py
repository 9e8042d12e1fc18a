"""Issue 16, items 3 and 4: memory of the base and the adapter under quantization, and the size of the dequantized
GGUF cache; measured on the embedded model, computed for Llama-3.2-1B and the shipped 8B config.

Measured: the embedded SmolLM2-135M loaded with `quantization` none / 4bit / 8bit as `train` loads it
(`base_models.load_base_model`, then PEFT's k-bit preparation, which keeps the unquantized parts in fp32), its bytes
read from its state dict (bitsandbytes stores a 4-bit weight as packed uint8 plus its quantization state, an 8-bit
one as int8 plus per-row scales). Computed: the same byte counts from the parameter shapes alone
(``base_bytes``), checked against the measurement, then applied to Llama-3.1-8B's shapes (built on the meta device,
nothing is allocated) with the adapter of `configs/llama-3.1-8b-gsm8k.yaml` (R = 256 on every linear layer), at 16
bytes per adapter parameter (fp32 weight, gradient and AdamW's two moments). Activations are not counted: they
depend on batch size, sequence length and gradient checkpointing.

GGUF cache: a `.gguf` base is dequantized once into a safetensors folder (`base_models.dequantized_gguf`) in the
`--dtype` of the run (float32 by default, bfloat16 halves it). Measured: the embedded model's two cache folders.
Computed: parameters × bytes per parameter for Llama-3.2-1B and Llama-3.1-8B.

    python benchmarks/model_memory.py
"""
import argparse
import copy
import os
import platform

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, LlamaConfig

from matryoshka_lora.base_models import load_base_model, resolve_model
from matryoshka_lora.files import read_yaml
from matryoshka_lora.model import adapter_shapes
from matryoshka_lora.training.budget import BYTES_PER_TRAINED_PARAMETER
from matryoshka_lora.training.config import TrainConfig

# the shapes of meta-llama/Llama-3.1-8B-Instruct's and Llama-3.2-1B's config.json
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
GIB = 2**30


def measured_bytes(model) -> int:
    """Bytes of the distinct tensors of the state dict (tied embeddings counted once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)}
    return sum(seen.values())


def base_bytes(model, quantization: str, dtype_bytes: int) -> int:
    """Bytes of the base as ``train`` holds it, from the shapes: the decoder's linear weights quantized
    (4bit: NF4 packed two per byte, one uint8 absmax per 64 weights, one fp32 absmax per 256 of those; 8bit: int8
    plus an fp32 scale per output row), everything else (embeddings, lm_head, norms) in fp32 after PEFT's k-bit
    preparation; unquantized: every parameter in the model's dtype."""
    total = 0
    for name, p in model.named_parameters():
        quantized = p.dim() == 2 and "layers." in name and quantization != "none"
        n = p.numel()
        if not quantized:
            total += n * (4 if quantization != "none" else dtype_bytes)
        elif quantization == "4bit":
            total += n // 2 + n // 64 + (n // 64 // 256 + 1) * 4
        else:
            total += n + p.shape[0] * 4
    return total


def measure_embedded() -> list[tuple[str, int, int]]:
    rows = []
    for quantization in ("none", "4bit", "8bit"):
        model = load_base_model("smollm2", "float32", device="cpu", quantization=quantization)
        if quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
        rows.append((quantization, measured_bytes(model), base_bytes(skeleton, quantization, 4)))
    return rows


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def gguf_cache_sizes() -> None:
    print("\nDequantized GGUF cache (model + tokenizer folder)")
    print("| model | float32 GiB | bfloat16 GiB | how |")
    print("|---|---|---|---|")
    sizes = [folder_bytes(resolve_model("smollm2", dtype)) for dtype in ("float32", "bfloat16")]
    print(f"| SmolLM2-135M-Instruct (embedded) | {sizes[0] / GIB:.2f} | {sizes[1] / GIB:.2f} | measured |")
    for name, shape in (("Llama-3.2-1B", LLAMA_32_1B), ("Llama-3.1-8B", LLAMA_31_8B)):
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(LlamaConfig(**shape)).parameters())
        print(f"| {name} ({n / 1e9:.2f} B parameters) | {n * 4 / GIB:.1f} | {n * 2 / GIB:.1f} | computed |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llama-3.1-8b-gsm8k.yaml")
    args = p.parse_args()
    print(f"{platform.machine()}, torch {torch.__version__}")
    print("\nSmolLM2-135M-Instruct as train loads it (CPU): measured vs computed bytes of the base")
    print("| quantization | measured MiB | computed MiB | computed / measured |")
    print("|---|---|---|---|")
    for quantization, measured, computed in measure_embedded():
        print(f"| {quantization} | {measured / 2**20:.1f} | {computed / 2**20:.1f} | {computed / measured:.3f} |")

    values = read_yaml(args.config)
    config = TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__})
    config.validate()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_31_8B))
    shapes = adapter_shapes(skeleton, config.matryoshka_config())
    adapter = sum(config.rank * (i + o) for i, o in shapes.values())
    train_state = adapter * BYTES_PER_TRAINED_PARAMETER
    params = sum(p.numel() for p in skeleton.parameters())
    print(f"\nLlama-3.1-8B ({params / 1e9:.2f} B parameters), {args.config}: R = {config.rank} on "
          f"{len(shapes)} layers = {adapter / 1e6:.0f} M adapter parameters, {train_state / GIB:.1f} GiB with "
          "gradients and AdamW state (computed)")
    print("| base | base GiB | + adapter training state GiB |")
    print("|---|---|---|")
    for label, quantization, dtype_bytes in (("bf16", "none", 2), ("8bit (LLM.int8)", "8bit", 2),
                                             ("4bit (NF4, double quantization)", "4bit", 2)):
        base = base_bytes(skeleton, quantization, dtype_bytes)
        print(f"| {label} | {base / GIB:.1f} | {(base + train_state) / GIB:.1f} |")
    gguf_cache_sizes()


if __name__ == "__main__":
    main()
