"""`matryoshka-lora export`: ranks of a run as stock PEFT adapters or merged models, and bad input."""
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, use_rank
from matryoshka_lora.cli import main
from conftest import randomize_


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = randomize_(get_matryoshka_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                            MatryoshkaConfig(rank=4, scaling="sqrt", method="matryoshka")))
    model.save_pretrained(out)
    (out / "train_config.yaml").write_text(yaml.safe_dump({"model": tiny_llama_dir, "model_path": tiny_llama_dir}))
    return out, model


def test_export_adapters_and_merged(run, tiny_llama_dir, tmp_path):
    out, model = run
    assert main(["export", str(out), "--ranks", "1,4", "--output_dir", str(tmp_path / "a")]) == 0
    assert main(["export", str(out), "--ranks", "2", "--merge", "--output_dir", str(tmp_path / "m")]) == 0
    ids = torch.randint(0, 100, (2, 6))
    for k in (1, 4):
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "a" / f"rank-{k}")
        with use_rank(model, k), torch.no_grad():
            torch.testing.assert_close(stock.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "rank-2").eval()
    with use_rank(model, 2), torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args,message", [(["--ranks", "5"], "--ranks [5] outside 1..4"),
                                          (["--ranks", "a"], "--ranks 'a' is not valid")])
def test_export_bad_input(run, tmp_path, capsys, args, message):
    assert main(["export", str(run[0]), "--output_dir", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_export_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_export_under_the_other_inference_rule(run, tiny_llama_dir, tmp_path):
    """--inference prefix folds P[:k] into B: stock PEFT then matches the model read under the prefix rule."""
    out, model = run
    assert main(["export", str(out), "--ranks", "2", "--inference", "prefix", "--output_dir", str(tmp_path)]) == 0
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "rank-2").eval()
    ids = torch.randint(0, 100, (2, 6))
    state, paper = model.matryoshka, model.matryoshka.config
    with torch.no_grad():
        with use_rank(model, 2):
            as_paper = model(ids).logits
        state.config = paper.read_as("prefix")  # before use_rank, which sets the gates from the config
        try:
            with use_rank(model, 2):
                as_prefix = model(ids).logits
        finally:
            state.config = paper
        got = stock(ids).logits
    torch.testing.assert_close(got, as_prefix, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, as_paper, atol=1e-3)  # P[:2] = [2.08, 1.08] (sqrt scaling), not s_2 = 0.71
