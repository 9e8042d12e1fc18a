"""`matryoshka-lora train`: config handling, the run folder, exact resume, DyLoRA rank draws, and bad input."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from matryoshka_lora import cli
from matryoshka_lora.cli.train import parse_args
from matryoshka_lora.files import read_yaml
from matryoshka_lora.training.config import FIELDS, build_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_args(tiny_llama_dir):
    return ["--model", tiny_llama_dir, "--max_examples", "24", "--batch_size", "4", "--max_length", "96",
            "--logging_steps", "1", "--learning_rate", "0.01", "--warmup_steps", "0"]


def run_cli(argv, capsys):
    rc = cli.main(["train", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def dylora_run(tmp_path_factory, small_args):
    """A finished 4-step DyLoRA run with checkpoints at steps 2 and 4."""
    out = str(tmp_path_factory.mktemp("runs") / "dylora")
    assert cli.main(["train", *small_args, "--method", "dylora", "--max_steps", "4", "--save_steps", "2",
                     "--output_dir", out, "--seed", "5"]) == 0
    return out


def test_run_folder_layout(dylora_run, tiny_llama_dir):
    files = set(os.listdir(dylora_run))
    assert {"adapter_config.json", "adapter_model.safetensors", "matryoshka_config.json", "train_config.yaml",
            "tokenizer.json", "tokenizer_config.json", "train_log.jsonl", "run_complete.json",
            "checkpoints"} <= files
    assert not [f for f in files if f.startswith(".final-tmp")]
    saved = yaml.safe_load(open(os.path.join(dylora_run, "train_config.yaml")))
    assert set(saved) == set(FIELDS) | {"model_path"}
    assert saved["model"] == tiny_llama_dir and saved["method"] == "dylora" and saved["max_steps"] == 4
    assert sorted(os.listdir(os.path.join(dylora_run, "checkpoints"))) == ["checkpoint-2", "checkpoint-4"]
    log = [json.loads(line) for line in open(os.path.join(dylora_run, "train_log.jsonl"))]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    for e in log:
        assert e["loss"] > 0 and e["learning_rate"] > 0 and e["tokens_per_s"] > 0 and e["rank"] in (1, 2, 4, 8)
    weights = load_file(os.path.join(dylora_run, "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # it trained


def test_dylora_rank_drawn_once_per_step_from_seeded_generator(dylora_run):
    log = [json.loads(line) for line in open(os.path.join(dylora_run, "train_log.jsonl"))]
    g = torch.Generator().manual_seed(5)
    expected = [[1, 2, 4, 8][int(torch.randint(4, (1,), generator=g))] for _ in range(4)]
    assert [e["ranks"] for e in log] == [[k] for k in expected]
    assert [e["rank"] for e in log] == expected


def test_gradient_accumulation_draws_per_optimizer_step(tmp_path, small_args, capsys):
    out = str(tmp_path / "ga")
    rc, _, err = run_cli([*small_args, "--method", "dylora", "--max_steps", "3", "--gradient_accumulation_steps",
                          "2", "--batch_size", "2", "--logging_steps", "3", "--save_steps", "0",
                          "--output_dir", out], capsys)
    assert rc == 0, err
    (entry,) = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert len(entry["ranks"]) == 3  # 3 optimizer steps of 2 micro-batches each: 3 draws, not 6


def test_load_run_gives_the_trained_model(dylora_run):
    from matryoshka_lora.model import use_rank
    from matryoshka_lora.adapter_io import load_run

    model, tokenizer, config = load_run(dylora_run)
    assert config["method"] == "dylora" and tokenizer.pad_token is not None
    ids = tokenizer(["Question: 1+1?\nAnswer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), use_rank(model, 8):
        full = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(full, base)


def test_resume_continues_exactly(dylora_run, tmp_path, small_args, capsys):
    """An interrupted run (final files and the step-4 checkpoint lost) resumes from step 2 to the same result."""
    copy = str(tmp_path / "copy")
    shutil.copytree(dylora_run, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "checkpoint-4"))
    for name in ("run_complete.json", "adapter_model.safetensors", "adapter_config.json"):
        os.remove(os.path.join(copy, name))
    rc, out, err = run_cli([*small_args, "--method", "dylora", "--max_steps", "4", "--save_steps", "2",
                            "--output_dir", copy, "--seed", "5", "--resume"], capsys)
    assert rc == 0, err
    assert "resuming from" in out
    a = load_file(os.path.join(dylora_run, "adapter_model.safetensors"))
    b = load_file(os.path.join(copy, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log_a = [json.loads(x) for x in open(os.path.join(dylora_run, "train_log.jsonl"))]
    log_b = [json.loads(x) for x in open(os.path.join(copy, "train_log.jsonl"))]
    assert [e["step"] for e in log_b] == [1, 2, 3, 4]
    assert [e["rank"] for e in log_b] == [e["rank"] for e in log_a]
    assert [e["loss"] for e in log_b] == pytest.approx([e["loss"] for e in log_a], rel=1e-5)


def test_resume_from_run_folder_alone(dylora_run, tmp_path, capsys):
    copy = str(tmp_path / "copy2")
    shutil.copytree(dylora_run, copy)
    rc, _, err = run_cli(["--resume", "--output_dir", copy, "--max_steps", "5"], capsys)
    assert rc == 0, err
    assert json.load(open(os.path.join(copy, "run_complete.json")))["steps"] == 5


def test_overwrite_replaces_and_refuses_without(dylora_run, tmp_path, small_args, capsys):
    copy = str(tmp_path / "copy3")
    shutil.copytree(dylora_run, copy)
    rc, _, err = run_cli([*small_args, "--output_dir", copy, "--max_steps", "1"], capsys)
    assert rc == 2 and "already holds a finished run; use --overwrite" in err
    rc, _, err = run_cli([*small_args, "--output_dir", copy, "--max_steps", "1", "--rank", "4"], capsys)
    assert rc == 2
    rc, _, err = run_cli([*small_args, "--output_dir", copy, "--max_steps", "1", "--overwrite", "--save_steps", "0",
                          "--method", "lora"], capsys)
    assert rc == 0, err
    assert yaml.safe_load(open(os.path.join(copy, "train_config.yaml")))["method"] == "lora"
    assert not glob.glob(os.path.join(copy, "checkpoints", "checkpoint-*"))  # the old run's are gone
    rc, _, err = run_cli([*small_args, "--output_dir", copy, "--max_steps", "1", "--resume", "--save_steps", "0"],
                         capsys)
    assert rc == 2 and "is finished and has no complete checkpoint" in err


def test_resume_with_a_different_config_is_refused(dylora_run, tmp_path, small_args, capsys):
    rc, _, err = run_cli([*small_args, "--method", "lora", "--output_dir", dylora_run, "--resume"], capsys)
    assert rc == 2 and "holds a different run" in err and "method" in err


def test_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in FIELDS:
        assert f"--{name}" in out
    assert "(default: lora-svd)" in out and "(default: 8)" in out


def test_cli_overrides_win_and_are_coerced(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 4\nlearning_rate: 1e-4\ntarget_modules: [q_proj, v_proj]\n")
    c = parse_args([str(cfg), "--rank", "16", "--train_ranks", "2,16", "--bf16", "--max_examples", "none",
                    "--target_modules", "q_proj,k_proj"])
    assert c.rank == 16 and c.train_ranks == [2, 16] and c.learning_rate == 1e-4 and c.bf16 is True
    assert c.max_examples is None and c.target_modules == ["q_proj", "k_proj"]
    assert c.output_dir == os.path.join("runs", "c")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_configs_are_valid_and_say_how_to_run(path):
    first = open(path).readline()
    assert first.startswith("# matryoshka-lora train configs/" + os.path.basename(path))
    c = build_config(read_yaml(path), {}, source=path)
    assert c.output_dir


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def write(path, text):
    path.write_text(text)
    return str(path)


BAD = [
    (["--rnak", "4"], "unknown config key 'rnak'; did you mean 'rank'?"),
    (["--rank", "0"], "rank=0 is not valid"),
    (["--rank", "4", "--train_ranks", "1,8"], "train_ranks [8] outside 1..4"),
    (["--method", "matroshka"], "method='matroshka' is not valid; choose one of matryoshka, dylora, lora"),
    (["--rank", "zero"], "rank='zero' is not valid; give an integer"),
    (["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    (["--data", "{tmp}/empty.jsonl"], "empty.jsonl is empty"),
    (["--data", "{tmp}/cols.jsonl"], "cols.jsonl:1: missing columns: found ['q', 'text']"),
    (["--model", "./no/such/model"], "model './no/such/model' not found"),
    (["--model", "nobody-here/no-such-model"], "cannot load model 'nobody-here/no-such-model'"),
    (["--output_dir", "{tmp}/notarun"], "is not empty and holds no matryoshka-lora run"),
    (["{tmp}/keys.yaml"], "unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
    (["{tmp}/missing.yaml"], "config file {tmp}/missing.yaml not found"),
    (["--report_to", "tensorbored"], "report_to='tensorbored': unknown"),
    (["--lr_scheduler_type", "wavy"], "wavy"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input(argv, message, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write(tmp_path / "bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    write(tmp_path / "empty.jsonl", "\n")
    write(tmp_path / "cols.jsonl", '{"text": "a", "q": 1}\n')
    write(tmp_path / "keys.yaml", "rank: 4\nlearning_rat: 0.1\n")
    (tmp_path / "notarun").mkdir()
    write(tmp_path / "notarun" / "precious.txt", "x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv = ["--model", tiny_llama_dir, *argv]
    if "--output_dir" not in argv:
        argv = [*argv, "--output_dir", str(tmp_path / "out")]
    rc, out, err = run_cli([*argv, "--max_steps", "1"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("matryoshka-lora train: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Traceback" not in err + out
    assert not os.path.exists(tmp_path / "out")
    assert os.listdir(tmp_path / "notarun") == ["precious.txt"]


def test_all_problems_reported_at_once(capsys, tmp_path):
    rc, _, err = run_cli(["--rank", "0", "--method", "x", "--batch_size", "0", "--output_dir", str(tmp_path / "o")],
                         capsys)
    assert rc == 2 and "rank=0" in err and "method='x'" in err and "batch_size=0" in err


def test_empty_after_truncation(tmp_path, tiny_llama_dir, capsys):
    data = write(tmp_path / "long.jsonl", json.dumps({"prompt": "word " * 100, "completion": "x"}) + "\n")
    rc, out, err = run_cli(["--model", tiny_llama_dir, "--data", data, "--max_length", "8",
                            "--output_dir", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no example left to train on" in err and "1 dropped" in out
    assert not os.path.exists(tmp_path / "o")


def test_bad_input_through_python_m(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "matryoshka_lora", "train", "--rnak", "4", "--methd", "lora",
                        "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == ("matryoshka-lora train: error: unknown config key 'rnak'; did you mean 'rank'?; "
                                "unknown config key 'methd'; did you mean 'method'?")
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------- the embedded model

@pytest.mark.integration
def test_embedded_smollm2_trains_end_to_end(tmp_path, capsys):
    from matryoshka_lora.adapter_io import load_run

    out = str(tmp_path / "smol")
    rc, stdout, err = run_cli(["--max_steps", "2", "--max_examples", "4", "--batch_size", "1", "--max_length", "96",
                               "--rank", "4", "--save_steps", "0", "--logging_steps", "1", "--output_dir", out],
                              capsys)
    assert rc == 0, err
    assert "trained lora-svd R=4" in stdout and "next: matryoshka-lora eval" in stdout  # the default method
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert len(log) == 2 and log[0]["loss"] < 5  # a pretrained model, not random: low loss on simple English
    model, tokenizer, config = load_run(out)
    assert config["model"] == "smollm2" and os.path.isdir(config["model_path"])
    assert model.matryoshka.config.rank == 4
