"""Bad input the probe found: a rank that cannot fit, non-finite adapter tensors, adapter files that contradict
each other. Each is one line naming what is wrong, exit 2 on the command line, before anything is written."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import VOCAB, tiny_model, wrapped
from matryoshka_lora import AdapterFileError, MatryoshkaConfig, get_matryoshka_model, load_matryoshka_model
from matryoshka_lora.cli import main
from matryoshka_lora.training import budget

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_run")
TRAIN = ["--model", os.path.join(FIXTURE, "base"), "--max_examples", "8", "--max_length", "64", "--max_steps", "1",
         "--save_steps", "0", "--use_cpu"]


def test_rank_above_a_layer_dimension_is_refused_before_allocation(tmp_path, capsys):
    # the fixture's k_proj is 16 in, 8 out: a rank of a million would take GiBs per layer if allocated
    assert main(["train", *TRAIN, "--rank", "1000000", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "rank=1000000 is larger than layer model.layers.0.self_attn.q_proj allows (16 in, 16 out" in err
    assert "choose rank <= 8" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "run").exists()


def test_rank_that_fits_but_not_in_memory_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda device: 1 << 10)  # 1 KiB free
    assert main(["train", *TRAIN, "--rank", "8", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "rank=8: the adapter has" in err and "GiB free; lower rank" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_library_refuses_a_rank_above_a_layer_dimension():
    with pytest.raises(ValueError, match=r"k_proj allows \(32 in, 16 out, so rank <= 16\)"):
        get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=20, target_modules=["q_proj", "k_proj"]))
    get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=20, target_modules=["q_proj"]))  # 32 x 32: fits


@pytest.fixture
def saved(tmp_path):
    wrapped(rank=8).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused_naming_file_and_tensor(saved, value):
    path = saved / "adapter_model.safetensors"
    weights = load_file(path)
    key = sorted(k for k in weights if "lora_B" in k)[3]
    weights[key][0, 0] = value
    save_file(weights, path)
    with pytest.raises(AdapterFileError, match=rf"{path}: tensor {key} holds {'NaN' if value != value else 'Inf'}"):
        load_matryoshka_model(tiny_model(vocab_size=VOCAB), saved)


@pytest.mark.parametrize("file,changes,message", [
    ("adapter_config.json", {"r": 4}, "adapter_config.json says r=4 but the tensors of"),
    ("matryoshka_config.json", {"rank": 4, "train_ranks": [1, 2, 4]}, "matryoshka_config.json says rank=4 but"),
    ("adapter_config.json", {"lora_alpha": 16}, "adapter_config.json says lora_alpha=16 but matryoshka_config.json"),
    ("adapter_config.json", {"target_modules": ["q_proj"]}, "adapter_config.json says target_modules=['q_proj']"),
])
def test_contradicting_files_are_refused_naming_the_wrong_one(saved, file, changes, message):
    edit_json(saved / file, **changes)
    with pytest.raises(AdapterFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_matryoshka_model(tiny_model(vocab_size=VOCAB), saved)


def test_eval_of_a_non_finite_run_exits_2_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "run"), run)
    weights = load_file(run / "adapter_model.safetensors")
    key = next(k for k in sorted(weights) if "lora_A" in k)
    weights[key][1, 2] = float("nan")
    save_file(weights, run / "adapter_model.safetensors")
    assert main(["eval", str(run), "--task", "arithmetic", "--limit", "2", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert f"tensor {key} holds NaN" in err and "Traceback" not in err
    assert not (run / "eval").exists()
