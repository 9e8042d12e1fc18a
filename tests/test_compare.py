"""`compare` end to end on a tiny random model: every method trained, evaluated, tabulated and plotted."""
import json
import os

import pytest
import yaml

from matryoshka_lora.cli import main


def run_compare(model: str, out, methods: str, seeds: str) -> int:
    """`compare` with tiny settings: 2 steps, rank 4, 3 problems."""
    return main(["compare", "--model", model, "--data", "arithmetic", "--max_examples", "16", "--max_steps", "2",
                 "--batch_size", "4", "--rank", "4", "--logging_steps", "1", "--save_steps", "0",
                 "--methods", methods, "--seeds", seeds, "--limit", "3", "--max_new_tokens", "4",
                 "--output_dir", str(out)])


@pytest.fixture(scope="module")
def compared(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert run_compare(tiny_llama_dir, out, "matryoshka,lora-svd", "1,2") == 0
    return out


def test_compare_writes_table_plot_and_json(compared):
    summary = json.loads((compared / "compare.json").read_text())
    assert summary["ranks"] == [1, 2, 4] and summary["seeds"] == [1, 2]
    assert set(summary["methods"]) == {"matryoshka", "lora-svd"}
    for entry in summary["methods"].values():
        assert len(entry["per_rank"]) == 3 and set(entry["per_seed"]) == {"1", "2"}
        assert entry["aurac"] == pytest.approx(sum(s["aurac"] for s in entry["per_seed"].values()) / 2)
    table = (compared / "compare.md").read_text()
    assert "| matryoshka |" in table and "| lora-svd |" in table and "AURAC" in table
    assert (compared / "compare.png").stat().st_size > 1000
    # lora-svd needs the plain LoRA run of each seed, trained on the way
    assert (compared / "lora" / "seed-1" / "adapter_model.safetensors").exists()
    assert json.loads((compared / "lora-svd" / "seed-2" / "matryoshka_config.json").read_text())["scaling"] == "none"


def test_compare_reuses_finished_runs(compared, tiny_llama_dir, capsys):
    before = os.path.getmtime(compared / "matryoshka" / "seed-1" / "adapter_model.safetensors")
    # a run from a version without some keys: reused, the missing keys count as their defaults
    saved = compared / "matryoshka" / "seed-1" / "train_config.yaml"
    values = yaml.safe_load(saved.read_text())
    assert values.pop("fsdp") == "" and values.pop("deepspeed") is None
    saved.write_text(yaml.safe_dump(values))
    assert run_compare(tiny_llama_dir, compared, "matryoshka", "1") == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert os.path.getmtime(compared / "matryoshka" / "seed-1" / "adapter_model.safetensors") == before


def test_compare_reuses_the_svd_run_and_its_evaluation(compared, tiny_llama_dir, capsys):
    adapter = compared / "lora-svd" / "seed-1" / "adapter_model.safetensors"
    before = os.path.getmtime(adapter)
    assert run_compare(tiny_llama_dir, compared, "lora-svd", "1") == 0
    assert "reusing finished ranks pretrained, 1, 2, 4 from" in capsys.readouterr().out
    assert os.path.getmtime(adapter) == before


@pytest.mark.parametrize("args,message", [
    (["--methods", "matryoshka,qlora"], "['qlora'] not valid; choose from matryoshka"),
    (["--seeds", "a,b"], "--seeds 'a,b' is not valid"),
    (["--rnak", "4"], "unknown config key 'rnak'; did you mean 'rank'?"),
])
def test_compare_bad_input(args, message, capsys, tmp_path):
    assert main(["compare", "--output_dir", str(tmp_path / "x")] + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
