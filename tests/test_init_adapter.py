"""``init_adapter`` and compare's ``lora-svd-dylora``: training that starts from a saved (re-factored) adapter."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, load_matryoshka_model, use_rank
from matryoshka_lora.cli import main
from matryoshka_lora.errors import UserError
from matryoshka_lora.svd import svd_adapter
from matryoshka_lora.training.init_adapter import load_init_adapter
from conftest import randomize_, tiny_model, tokens


@pytest.fixture
def svd_dir(tmp_path):
    lora = randomize_(get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=8, method="lora", scaling="rank")))
    lora.save_pretrained(tmp_path / "lora")
    return svd_adapter(tmp_path / "lora", tmp_path / "svd")


def test_a_run_started_from_an_adapter_computes_what_that_adapter_computes(svd_dir):
    """Broken if: the saved weights are not copied (the fresh model has lora_B = 0, so rank 8 equals the base)."""
    model = get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=8, method="dylora", scaling="none"))
    load_init_adapter(model, svd_dir)
    saved = load_matryoshka_model(tiny_model(), svd_dir)
    for k in (1, 2, 8):
        with use_rank(model, k), use_rank(saved, k), torch.no_grad():
            torch.testing.assert_close(model(tokens()).logits, saved(tokens()).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config,message", [
    (dict(rank=8, scaling="rank"), "differs from this run's adapter in scaling 'none' (the run: 'rank')"),
    (dict(rank=4, scaling="none"), "rank 8 (the run: 4)"),
    (dict(rank=8, scaling="none", target_modules=["q_proj"]), "does not fit this model"),
])
def test_an_adapter_of_another_shape_or_meaning_is_refused(svd_dir, config, message):
    model = get_matryoshka_model(tiny_model(), MatryoshkaConfig(method="dylora", **config))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_init_adapter(model, svd_dir)


def test_train_refuses_a_missing_init_adapter(tiny_llama_dir, tmp_path, capsys):
    assert main(["train", "--model", tiny_llama_dir, "--init_adapter", str(tmp_path / "nothing"), "--max_steps",
                 "1", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "init_adapter=" in err and "`matryoshka-lora svd`" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_compare_lora_svd_dylora_splits_the_steps_and_starts_from_the_refactored_lora(tiny_llama_dir, tmp_path):
    """LoRA for 85 % of the steps, its SVD, DyLoRA for the rest from it. Broken if: the DyLoRA phase starts from
    PEFT's init (init_adapter ignored: its lora_B is then within one step of 0, far from the re-factored one)."""
    out = tmp_path / "c"
    assert main(["compare", "--model", tiny_llama_dir, "--data", "arithmetic", "--max_examples", "16",
                 "--max_steps", "7", "--batch_size", "4", "--rank", "4", "--logging_steps", "1", "--save_steps", "0",
                 "--learning_rate", "0.05", "--warmup_steps", "0", "--methods", "lora-svd-dylora", "--seeds", "1", "--limit", "2",
                 "--max_new_tokens", "4", "--output_dir", str(out)]) == 0
    run, lora, svd = (out / "lora-svd-dylora" / f"seed-1{s}" for s in ("", "-lora", "-svd"))
    phases = [yaml.safe_load(open(r / "train_config.yaml")) for r in (lora, run)]
    assert [p["max_steps"] for p in phases] == [6, 1] and [p["method"] for p in phases] == ["lora", "dylora"]
    assert phases[1]["init_adapter"] == str(svd) and phases[1]["scaling"] == "none"
    assert json.load(open(svd / "svd_source.json"))["lora_run"] == str(lora)
    summary = json.load(open(out / "compare.json"))
    assert list(summary["methods"]) == ["lora-svd-dylora"]
    trained, start = load_file(run / "adapter_model.safetensors"), load_file(svd / "adapter_model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the DyLoRA phase trained
    # from the re-factored adapter: one AdamW step moves each weight by at most the learning rate
    assert max((trained[k] - start[k]).abs().max().item() for k in start) <= 0.05 + 1e-6
    assert max(start[k].abs().max().item() for k in start if "lora_B" in k) > 0.1  # far from PEFT's B = 0
