"""QLoRA (`quantization: 4bit|8bit`): nested adapters on PEFT's bitsandbytes LoRA layers.

bitsandbytes >= 0.48 runs 4-bit and 8-bit layers on the CPU, so these run in CI. Deliberate breaks they catch: the
gate not applied on the bnb layers (fused and reference then differ at a rank below R), the base loaded
unquantized (the trained adapter is then that of a full-precision run), `eval` loading the base unquantized (its
per-rank loss then differs from the quantized model's), and an export that is not a plain PEFT adapter.
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import VOCAB, randomize_, save_tiny_llama, skip_unless, tiny_model
from matryoshka_lora import MatryoshkaConfig, cli, get_matryoshka_model, sample_rank, set_fused, set_rank, use_rank
from matryoshka_lora.adapter_io import load_run
from matryoshka_lora.base_models import load_base_model
from matryoshka_lora.methods import METHOD_NAMES

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(autouse=True)
def needs_bitsandbytes():
    skip_unless(HAS_BNB, "bitsandbytes is not installed (pip install bitsandbytes; CPU support from 0.48)")


# bitsandbytes >= 0.50 on an AVX512-BF16 CPU repacks a 4-bit weight for inference in blocks of 64 inputs and
# 32 outputs, and fails on narrower layers (every real model's are wider), so these models are 64 wide.
BNB_WIDTH = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_for_bnb")
    tiny_model("llama", VOCAB, hidden_size=BNB_WIDTH).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def bnb_llama_dir(tmp_path_factory, smol_tokenizer_dir):
    """``tiny_llama_dir`` at BNB_WIDTH: a tiny random Llama with the SmolLM2 tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("bnb_llama"), smol_tokenizer_dir, hidden_size=BNB_WIDTH)


def quantized_pair(folder, quantization, **cfg):
    """The same quantized model twice, wrapped: one on the fused path, one on PEFT's bnb forward + gate hook."""
    cfg.setdefault("rank", 8)
    models = []
    for _ in range(2):
        base = load_base_model(folder, quantization=quantization, device="cpu")
        models.append(randomize_(get_matryoshka_model(base, MatryoshkaConfig(**cfg))).train())
    set_fused(models[1], False)
    return models


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_gate_on_bitsandbytes_layers(tiny_dir, quantization, method, one_thread):
    fused, reference = quantized_pair(tiny_dir, quantization, method=method)
    layer = next(iter(fused.matryoshka.layers.values()))
    assert type(layer).__module__ == "peft.tuners.lora.bnb"  # PEFT's bitsandbytes LoRA layer, not a Linear
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    for model in (fused, reference):
        sample_rank(model, torch.Generator().manual_seed(3))
    loss_f, grads_f = loss_and_grads(fused, ids)
    loss_r, grads_r = loss_and_grads(reference, ids)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_r.keys() and grads_r
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # rank 2 differs from rank 8: the gate acts on these layers
        fused.eval()
        set_rank(fused, 2)
        low = fused(ids).logits
        set_rank(fused, 8)
        assert not torch.allclose(low, fused(ids).logits)


def train(folder, out, *extra):
    return cli.main(["train", "--model", folder, "--max_examples", "16", "--batch_size", "4", "--max_length", "96",
                     "--learning_rate", "0.01", "--warmup_steps", "0", "--logging_steps", "1", "--method",
                     "matryoshka", "--output_dir", out, *extra])


@pytest.fixture(scope="module")
def qlora_run(bnb_llama_dir, tmp_path_factory):
    """4 steps of 4-bit training with checkpoints at 2 and 4, and the same run unquantized."""
    root = tmp_path_factory.mktemp("qlora")
    runs = {}
    for quantization in ("4bit", "none"):
        runs[quantization] = str(root / quantization)
        assert train(bnb_llama_dir, runs[quantization], "--max_steps", "4", "--save_steps", "2",
                     "--quantization", quantization) == 0
    return runs


def test_qlora_trains_on_the_quantized_base(qlora_run):
    quantized = load_file(os.path.join(qlora_run["4bit"], "adapter_model.safetensors"))
    full = load_file(os.path.join(qlora_run["none"], "adapter_model.safetensors"))
    assert quantized.keys() == full.keys()
    b = [k for k in quantized if "lora_B" in k]
    assert all(quantized[k].dtype == torch.float32 for k in quantized)  # the adapter stays full precision
    assert any(quantized[k].abs().sum() > 0 for k in b)  # it trained
    assert any(not torch.equal(quantized[k], full[k]) for k in b)  # and not on the full-precision weights


def test_qlora_resume_is_exact(qlora_run, bnb_llama_dir, tmp_path):
    """The run interrupted after step 2 (its step-4 checkpoint and final files lost) resumes to the same adapter."""
    out = str(tmp_path / "resumed")
    shutil.copytree(qlora_run["4bit"], out)
    shutil.rmtree(os.path.join(out, "checkpoints", "checkpoint-4"))
    for name in ("run_complete.json", "adapter_model.safetensors", "adapter_config.json"):
        os.remove(os.path.join(out, name))
    assert train(bnb_llama_dir, out, "--max_steps", "4", "--save_steps", "2", "--quantization", "4bit",
                 "--resume") == 0
    whole = load_file(os.path.join(qlora_run["4bit"], "adapter_model.safetensors"))
    resumed = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6)


def test_qlora_eval_loads_the_base_quantized(qlora_run, tmp_path):
    run = qlora_run["4bit"]
    args = ["--score_only", "--limit", "4", "--ranks", "1,8", "--no_progress"]
    assert cli.main(["eval", run, *args]) == 0  # as trained: 4-bit
    assert cli.main(["eval", run, *args, "--quantization", "none", "--output_dir", str(tmp_path / "full")]) == 0
    as_trained = json.load(open(os.path.join(run, "eval-score", "eval.json")))
    full = json.load(open(tmp_path / "full" / "eval.json"))
    assert as_trained["settings"]["quantization"] == "4bit" and "quantization" not in full["settings"]
    loss = {name: [r["metrics"]["loss"] for r in result["per_rank"]]
            for name, result in (("4bit", as_trained), ("none", full))}
    assert all(abs(a - b) > 1e-6 for a, b in zip(loss["4bit"], loss["none"]))  # the base differs
    model, _, _ = load_run(run)
    assert type(next(iter(model.matryoshka.layers.values()))).__module__ == "peft.tuners.lora.bnb"


def test_exported_rank_is_a_plain_adapter_for_the_full_precision_base(qlora_run, bnb_llama_dir, tmp_path):
    run = qlora_run["4bit"]
    assert cli.main(["export", run, "--ranks", "2", "--output_dir", str(tmp_path / "export")]) == 0
    config = json.load(open(tmp_path / "export" / "rank-2" / "adapter_config.json"))
    assert config["r"] == 2 and "quantization" not in json.dumps(config).lower()
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(1))
    model, _, _ = load_run(run, quantization="none")
    with torch.no_grad(), use_rank(model.eval(), 2):
        want = model(ids).logits
    base = load_base_model(bnb_llama_dir)
    stock = PeftModel.from_pretrained(base, str(tmp_path / "export" / "rank-2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_quantization_is_one_line(bnb_llama_dir, tmp_path, capsys):
    out = str(tmp_path / "bad")
    assert train(bnb_llama_dir, out, "--max_steps", "1", "--quantization", "2bit") == 2
    err = capsys.readouterr().err
    assert "quantization='2bit' is not valid; choose one of none, 4bit, 8bit" in err
    assert "Traceback" not in err and not os.path.exists(out)
