"""The lora-svd baseline: prefixes of the re-factored adapter are the best rank-k approximations of ΔW."""
import os
import warnings

import pytest
import torch

from matryoshka_lora import MatryoshkaConfig, export_rank, get_matryoshka_model, load_matryoshka_model, use_rank
from matryoshka_lora.cli import main
from matryoshka_lora.svd import energy_captured, svd_adapter, svd_factors
from conftest import randomize_, tiny_model, tokens


def test_factors_reproduce_delta_and_truncate_optimally():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 20, generator=g), torch.randn(12, 8, generator=g)
    A2, B2 = svd_factors(A, B, 0.25)
    delta = 0.25 * B @ A
    torch.testing.assert_close(B2 @ A2, delta, atol=1e-5, rtol=1e-5)
    S = torch.linalg.svdvals(delta.double())
    for k in range(1, 9):
        err = torch.linalg.matrix_norm((delta - B2[:, :k] @ A2[:k]).double())
        # Eckart–Young: the Frobenius error of the best rank-k approximation
        assert err.item() == pytest.approx(S[k:].square().sum().sqrt().item(), rel=1e-4, abs=1e-5)


def test_svd_adapter_at_full_rank_equals_lora(tmp_path):
    model = randomize_(get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=8, method="lora", scaling="rank")))
    model.save_pretrained(tmp_path / "lora")
    svd_adapter(tmp_path / "lora", tmp_path / "svd")
    svd = load_matryoshka_model(tiny_model(), tmp_path / "svd")
    assert svd.matryoshka.config.scaling == "none"
    with use_rank(model, 8), use_rank(svd, 8), torch.no_grad():
        torch.testing.assert_close(svd(tokens()).logits, model(tokens()).logits, atol=1e-4, rtol=1e-4)


def test_svd_adapter_refuses_other_methods(tmp_path):
    model = get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=4, method="matryoshka"))
    with pytest.raises(ValueError, match="method 'lora'"):
        svd_adapter(model, tmp_path / "svd")


# --- `matryoshka-lora svd`: any PEFT LoRA adapter, or a run trained with method lora ----------------------

def peft_adapter(path, **lora):
    """A stock PEFT LoRA adapter on the tiny model, with non-zero lora_B, saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(**lora))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("lora,ranks", [
    (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), [1, 2, 4, 8]),
    (dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"), [1, 2, 4]),
    (dict(r=6, lora_alpha=3, target_modules=["o_proj", "up_proj"], layers_to_transform=[0]), [1, 2, 4, 6]),
])
def test_svd_command_on_a_peft_adapter(lora, ranks, tmp_path, capsys):
    peft_model = peft_adapter(tmp_path / "peft", **lora)
    assert main(["svd", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert f"wrote the nested adapter (R = {lora['r']}) to {tmp_path / 'peft'}-svd" in out
    assert "matryoshka-lora export" in out and "matryoshka-lora eval" not in out  # not a training run
    nested = load_matryoshka_model(tiny_model(), tmp_path / "peft-svd")
    assert nested.matryoshka.config.train_ranks == ranks
    with use_rank(nested, lora["r"]), torch.no_grad():
        torch.testing.assert_close(nested(tokens()).logits, peft_model(tokens()).logits, atol=1e-4, rtol=1e-4)
    # the kept share of ‖ΔW‖² grows with the rank and is all of it at r
    kept = [float(x.rstrip("%")) for x in out.split("| kept | ")[1].split(" |\n")[0].split(" | ")]
    assert kept == sorted(kept) and kept[-1] == 100.0 and kept[0] < 100.0


def test_svd_command_on_a_training_run(tmp_path, capsys):
    model = randomize_(get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=8, method="lora", scaling="sqrt")))
    model.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "train_config.yaml").write_text("method: lora\nrank: 8\n")
    assert main(["svd", str(tmp_path / "run"), "--output_dir", str(tmp_path / "nested"), "--ranks", "2,8"]) == 0
    assert f"matryoshka-lora eval {tmp_path / 'nested'}" in capsys.readouterr().out
    assert (tmp_path / "nested" / "train_config.yaml").read_text() == "method: lora\nrank: 8\n"
    nested = load_matryoshka_model(tiny_model(), tmp_path / "nested")
    assert nested.matryoshka.config.train_ranks == [2, 8]
    with use_rank(model, 8), use_rank(nested, 8), torch.no_grad():
        torch.testing.assert_close(nested(tokens()).logits, model(tokens()).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lora,message", [
    (dict(r=4, target_modules=["q_proj"], use_dora=True), "use_dora is set"),
    (dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), "rank_pattern is not empty"),
    (dict(r=4, target_modules=["q_proj", "embed_tokens"]), "it holds lora_embedding_A, lora_embedding_B weights"),
])
@pytest.mark.filterwarnings("ignore:.*(tie_word_embeddings|save_embedding_layers).*:UserWarning")
def test_svd_command_refuses_adapters_it_cannot_refactor(lora, message, tmp_path, capsys):
    peft_adapter(tmp_path / "peft", **lora)
    assert main(["svd", str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err
    assert "cannot be re-factored" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "peft-svd").exists()


def test_svd_command_keeps_an_existing_output(tmp_path, capsys):
    peft_adapter(tmp_path / "peft", r=4, target_modules=["q_proj"])
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "keep.txt").write_text("mine")
    assert main(["svd", str(tmp_path / "peft"), "--output_dir", str(tmp_path / "nested")]) == 2
    assert "already exists; add --overwrite" in capsys.readouterr().err
    assert os.listdir(tmp_path / "nested") == ["keep.txt"]
    assert main(["svd", str(tmp_path / "peft"), "--output_dir", str(tmp_path / "nested"), "--overwrite"]) == 0
    assert (tmp_path / "nested" / "adapter_model.safetensors").exists() and not (tmp_path / "nested" / "keep.txt").exists()
    assert main(["svd", str(tmp_path / "missing")]) == 2
    assert "adapter folder" in capsys.readouterr().err


def test_energy_captured_is_the_share_of_squared_singular_values():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(12, 4, generator=g))[0]  # (out, 4)
    V = torch.linalg.qr(torch.randn(20, 4, generator=g))[0]  # (in, 4)
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5])
    A, B = svd_factors(V.T.contiguous(), (U * sigma).contiguous(), 1.0)  # ΔW = U diag(σ) Vᵀ
    weights = {"m.lora_A.weight": A, "m.lora_B.weight": B, "n.lora_A.weight": A, "n.lora_B.weight": B}
    total = sigma.square().sum().item()
    expected = [sigma[:k].square().sum().item() / total for k in (1, 2, 4)]
    assert energy_captured(weights, [1, 2, 4]) == pytest.approx(expected, rel=1e-6)


def test_train_method_lora_svd_is_lora_then_svd(tmp_path, tiny_llama_dir, capsys):
    """`train` with the default method (lora-svd) gives exactly `train --method lora` followed by `svd`, in one
    run folder that holds only the nested adapter."""
    from safetensors.torch import load_file
    args = ["train", "--model", tiny_llama_dir, "--max_examples", "8", "--batch_size", "4", "--max_length", "64",
            "--max_steps", "3", "--learning_rate", "0.01", "--warmup_steps", "0", "--seed", "3", "--scaling", "rank",
            "--save_steps", "2"]
    assert main([*args, "--output_dir", str(tmp_path / "default")]) == 0
    assert "re-factored by SVD at the save" in capsys.readouterr().out
    assert main([*args, "--method", "lora", "--output_dir", str(tmp_path / "lora")]) == 0
    svd_adapter(tmp_path / "lora", tmp_path / "lora-svd")
    ours = load_file(tmp_path / "default" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "lora-svd" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and any("lora_B" in k and v.abs().sum() > 0 for k, v in ours.items())
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    config = MatryoshkaConfig.load(tmp_path / "default")
    assert (config.method, config.scaling) == ("lora-svd", "none")
    assert not [f for f in os.listdir(tmp_path / "default") if f.startswith(".")]
    # its checkpoint holds the plain adapter that resumes: reading it as nested warns, and svd nests it
    checkpoint = str(tmp_path / "default" / "checkpoints" / "checkpoint-2")
    with pytest.warns(UserWarning, match="not nested yet; `matryoshka-lora svd .*checkpoint-2` nests it"):
        export_rank(checkpoint, 2, tmp_path / "export-checkpoint")
    svd_adapter(checkpoint, tmp_path / "checkpoint-svd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_rank(str(tmp_path / "default"), 2, tmp_path / "export-final")
        export_rank(str(tmp_path / "checkpoint-svd"), 2, tmp_path / "export-checkpoint-svd")
