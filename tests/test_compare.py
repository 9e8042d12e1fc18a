"""`compare` end to end on a tiny random model: every method trained, evaluated, tabulated and plotted."""
import json
import os

import pytest
import yaml

from matryoshka_lora.cli import main
from matryoshka_lora.compare import aggregate, compare
from matryoshka_lora.errors import UserError


def run_compare(model: str, out, methods: str, seeds: str, *extra: str) -> int:
    """`compare` with tiny settings: 2 steps, rank 4, 3 problems."""
    return main(["compare", "--model", model, "--data", "arithmetic", "--max_examples", "16", "--max_steps", "2",
                 "--batch_size", "4", "--rank", "4", "--logging_steps", "1", "--save_steps", "0",
                 "--methods", methods, "--seeds", seeds, "--limit", "3", "--max_new_tokens", "4",
                 "--output_dir", str(out), *extra])


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
    # lora-svd needs the plain LoRA run of each seed, trained on the way but not evaluated (not asked for)
    assert (compared / "lora" / "seed-1" / "adapter_model.safetensors").exists()
    assert not (compared / "lora" / "seed-1" / "eval").exists()
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


def test_compare_tabulates_another_metric_from_the_same_runs(compared, tiny_llama_dir, capsys):
    assert run_compare(tiny_llama_dir, compared, "matryoshka,lora-svd", "1,2", "--metric", "token_acc") == 0
    out = capsys.readouterr().out
    assert "reusing finished ranks pretrained, 1, 2, 4" in out and "token_acc (%)" in out
    summary = json.loads((compared / "compare.json").read_text())
    assert summary["metric"] == "token_acc" and set(summary["methods"]) == {"matryoshka", "lora-svd"}
    for m, entry in summary["methods"].items():
        for seed, per_seed in entry["per_seed"].items():
            evaluated = json.loads((compared / m / f"seed-{seed}" / "eval" / "eval.json").read_text())
            assert evaluated["metric"] == "exact_match_strict"
            assert per_seed["per_rank"] == [r["metrics"]["token_acc"] for r in evaluated["per_rank"]]
            assert summary["pretrained"] == evaluated["pretrained_metrics"]["token_acc"]


def test_compare_reuses_the_base_model_score_of_another_compare(compared, tiny_llama_dir, tmp_path, capsys):
    tiny = {"model": tiny_llama_dir, "data": "arithmetic", "max_examples": 16, "max_steps": 2, "batch_size": 4,
            "rank": 4, "logging_steps": 1, "save_steps": 0}
    source = compared / "matryoshka" / "seed-1" / "eval"
    summary = compare(None, ["dylora"], [3], str(tmp_path), tiny, {"limit": 3, "max_new_tokens": 4},
                      pretrained_from=str(source))
    assert "reusing finished ranks pretrained from" in capsys.readouterr().out
    copied = tmp_path / "dylora" / "seed-3" / "eval" / "ranks" / "pretrained.json"
    assert copied.read_bytes() == (source / "ranks" / "pretrained.json").read_bytes()
    assert summary["pretrained"] == json.loads(copied.read_text())["value"]


def _result(values: list[float], token_acc: list[float]) -> dict:
    """An evaluate_run result at ranks 1, 2, 4 with given primary values and token accuracies."""
    per_rank = [{"rank": k, "value": v, "metrics": {"exact_match_strict": v, "token_acc": t, "loss": 1.0}}
                for k, v, t in zip([1, 2, 4], values, token_acc)]
    return {"task": "gsm8k", "kind": "gsm8k", "metric": "exact_match_strict", "ranks": [1, 2, 4], "pretrained": 0.1,
            "pretrained_metrics": {"exact_match_strict": 0.1, "token_acc": 0.5}, "per_rank": per_rank,
            "log_aurac": 0.0, "run_dir": "x"}


def test_aggregate_by_metric():
    results = {"dylora": {0: _result([0.2, 0.4, 0.4], [0.6, 0.7, 0.9]), 1: _result([0.0, 0.2, 0.4], [0.6, 0.8, 0.7])}}
    primary = aggregate(results, ["dylora"], [0, 1])
    tokens = aggregate(results, ["dylora"], [0, 1], "token_acc")
    assert primary["metric"] == "exact_match_strict" and primary["pretrained"] == 0.1
    assert primary["methods"]["dylora"]["per_rank"] == pytest.approx([0.1, 0.3, 0.4])
    assert tokens["metric"] == "token_acc" and tokens["pretrained"] == 0.5
    assert tokens["methods"]["dylora"]["per_rank"] == pytest.approx([0.6, 0.75, 0.8])
    # trapezoids over ranks 1..4, normalised by the span 3: seed 0 (0.65 + 1.6) / 3, seed 1 (0.7 + 1.5) / 3
    assert tokens["methods"]["dylora"]["aurac"] == pytest.approx((2.25 / 3 + 2.2 / 3) / 2)
    with pytest.raises(UserError, match="reports exact_match_strict, token_acc; the runs"):
        aggregate(results, ["dylora"], [0, 1], "acc")


def test_compare_metric_the_task_does_not_report(compared, tiny_llama_dir, capsys):
    assert run_compare(tiny_llama_dir, compared, "matryoshka", "1", "--metric", "acc_norm") == 2
    err = capsys.readouterr().err
    assert "--metric 'acc_norm': the gsm8k task 'arithmetic' reports exact_match_strict" in err
    assert "token_acc" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--metric", "loss"], "--metric 'loss' is not valid; choose from acc, acc_norm, exact_match"),
    (["--methods", "matryoshka,qlora"], "['qlora'] not valid; choose from matryoshka"),
    (["--seeds", "a,b"], "--seeds 'a,b' is not valid"),
    (["--rnak", "4"], "unknown config key 'rnak'; did you mean 'rank'?"),
])
def test_compare_bad_input(args, message, capsys, tmp_path):
    assert main(["compare", "--output_dir", str(tmp_path / "x")] + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_compare_score_only_evaluates_without_generation_beside_the_full_evaluation(compared, tiny_llama_dir):
    assert run_compare(tiny_llama_dir, compared, "matryoshka,lora-svd", "1,2", "--score_only") == 0
    summary = json.loads((compared / "compare.json").read_text())
    assert summary["metric"] == "token_acc"
    for m, entry in summary["methods"].items():
        for seed, per_seed in entry["per_seed"].items():
            full = json.loads((compared / m / f"seed-{seed}" / "eval" / "eval.json").read_text())
            scored = json.loads((compared / m / f"seed-{seed}" / "eval-score" / "eval.json").read_text())
            assert full["metric"] == "exact_match_strict" and scored["metric"] == "token_acc"
            assert per_seed["per_rank"] == [r["metrics"]["token_acc"] for r in full["per_rank"]]
            assert "exact_match_strict" not in scored["per_rank"][0]["metrics"]


def test_compare_score_only_refuses_a_generated_metric_before_training(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "c"
    assert run_compare(tiny_llama_dir, out, "dylora", "1", "--score_only", "--metric", "exact_match_strict") == 2
    err = capsys.readouterr().err
    assert "--metric 'exact_match_strict' needs generation" in err and not out.exists()
