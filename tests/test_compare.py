"""`compare` end to end on a tiny random model: every method trained, evaluated, tabulated and plotted."""
import json
import os
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from matryoshka_lora.adapter_io import load_matryoshka_model
from matryoshka_lora.cli import main
from matryoshka_lora.compare import aggregate, compare
from matryoshka_lora.errors import UserError
from matryoshka_lora.ranks import aurac
from test_evaluate import (ANSWER_TOKENS, QUESTIONS, answering_base, answers_of, expected_gsm8k, greedy_answers,
                           write_jsonl)


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


def test_compare_continues_an_unfinished_run_from_its_checkpoint(tiny_llama_dir, tmp_path, capsys):
    """A study stopped mid-run (killed, or the session ended) goes on from the last checkpoint, to the very adapter
    an uninterrupted run gives (resume is bit-exact), instead of training again from step 0."""
    steps = ["--max_steps", "4", "--save_steps", "2"]
    assert run_compare(tiny_llama_dir, tmp_path, "dylora", "3", *steps) == 0
    run = tmp_path / "dylora" / "seed-3"
    whole = load_file(run / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in whole.items() if "lora_B" in k)  # B = 0 would hide a wrong resume
    for name in ("run_complete.json", "adapter_model.safetensors"):  # as if killed after checkpoint-2
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    capsys.readouterr()
    assert run_compare(tiny_llama_dir, tmp_path, "dylora", "3", *steps) == 0
    assert f"continuing the unfinished run {run} from {run / 'checkpoints' / 'checkpoint-2'}" in capsys.readouterr().out
    resumed = load_file(run / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


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


def test_compare_through_an_engine_without_vllm_fails_before_training(tiny_llama_dir, tmp_path, capsys):
    """Broken if: the engine's interpreter is checked only when the first run is evaluated (a run folder appears)."""
    out = tmp_path / "c"
    assert run_compare(tiny_llama_dir, out, "dylora", "1", "--engine", "vllm", "--python", sys.executable) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed for" in err and "Traceback" not in err and not out.exists()


# compare on answers that can be right: on the random model of `compared` every exact match is 0 at every rank, so
# tabulating another metric, rank or seed would go unseen there.
ANSWERED_METHODS, ANSWERED_SEEDS, ANSWERED_RANKS = ("matryoshka", "lora-svd"), (1, 2), (1, 2, 4)
METRICS = ("exact_match_strict", "exact_match_flexible", "token_acc")


def run_answered(model: str, out, task: str, *extra: str) -> int:
    """`compare` on test_evaluate's answering base: 2 steps at a learning rate high enough (0.3) that the trained
    ranks answer differently, rank 4, evaluated on ``task``."""
    return main(["compare", "--model", model, "--data", "arithmetic", "--max_examples", "16", "--max_steps", "2",
                 "--batch_size", "4", "--rank", "4", "--learning_rate", "0.3", "--logging_steps", "1",
                 "--save_steps", "0", "--methods", ",".join(ANSWERED_METHODS),
                 "--seeds", ",".join(map(str, ANSWERED_SEEDS)), "--max_new_tokens", str(ANSWER_TOKENS),
                 "--task", task, "--output_dir", str(out), *extra])


@pytest.fixture(scope="module")
def answered(smol_tokenizer_dir, tmp_path_factory):
    """A compare (matryoshka and lora-svd, seeds 1 and 2) on test_evaluate's answering base, evaluated on a gsm8k task
    whose references are the trained matryoshka's (seed 2) own answers at rank 2; and per method and seed the
    expected values at ranks 0 (the base model), 1, 2 and 4, computed from the saved adapters without the evaluation
    code."""
    d = tmp_path_factory.mktemp("answered")
    base_dir = answering_base(smol_tokenizer_dir, d / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    out, first = d / "compare", d / "first"
    first.mkdir()
    write_jsonl(first / "test.jsonl", [{"question": QUESTIONS[0], "answer": "#### 3"}])
    assert run_answered(base_dir, out, str(first)) == 0  # trains the runs (and evaluates a one-question task)
    models, completions = {}, {}
    for m in ANSWERED_METHODS:
        for seed in ANSWERED_SEEDS:
            model = AutoModelForCausalLM.from_pretrained(base_dir)
            model.set_attn_implementation("eager")
            models[m, seed] = model = load_matryoshka_model(model, str(out / m / f"seed-{seed}")).eval()
            completions[m, seed] = greedy_answers(model, tokenizer, QUESTIONS, ANSWERED_RANKS)
    base_answers = greedy_answers(model, tokenizer, QUESTIONS, [0])  # one base model, adapter off
    for c in completions.values():
        c.update(base_answers)
    numbers = answers_of(completions["matryoshka", 2][2])
    assert None not in numbers
    rows = [{"question": q, "answer": f"#### {n}"} for q, n in zip(QUESTIONS[:-1], numbers)]
    rows.append({"question": QUESTIONS[-1], "answer": "#### 9"})  # its true sum, which no rank writes
    task = d / "task"
    task.mkdir()
    write_jsonl(task / "test.jsonl", rows)
    expected = {key: expected_gsm8k(model, tokenizer, rows, completions[key]) for key, model in models.items()}
    assert run_answered(base_dir, out, str(task)) == 0  # evaluates the runs on the task
    # the values can tell a metric, a rank and a seed from another
    for metric in METRICS:
        curves = {key: tuple(e[k][metric] for k in ANSWERED_RANKS) for key, e in expected.items()}
        assert all(v > 0 for c in curves.values() for v in c), metric
        assert any(len(set(c)) > 1 for c in curves.values()), metric
        if metric != "token_acc":  # (token_acc: the runs agree on most reference tokens, and here on their count)
            assert all(curves[m, 1] != curves[m, 2] for m in ANSWERED_METHODS), metric
    for a, b in [("exact_match_strict", "exact_match_flexible"), ("exact_match_strict", "token_acc")]:
        assert any(e[k][a] != e[k][b] for e in expected.values() for k in ANSWERED_RANKS), (a, b)
    return {"base_dir": base_dir, "task": str(task), "out": out, "expected": expected}


def check_table(answered, metric: str):
    """compare.json's per-seed curves, their means, AURACs and the base model's value are the expected ``metric``."""
    summary = json.loads((answered["out"] / "compare.json").read_text())
    expected = answered["expected"]
    assert summary["metric"] == metric and summary["ranks"] == list(ANSWERED_RANKS)
    assert summary["pretrained"] == expected["matryoshka", 1][0][metric]
    for m in ANSWERED_METHODS:
        entry = summary["methods"][m]
        curves = {seed: [expected[m, seed][k][metric] for k in ANSWERED_RANKS] for seed in ANSWERED_SEEDS}
        for seed, curve in curves.items():
            assert entry["per_seed"][str(seed)]["per_rank"] == curve, (m, seed)
            assert entry["per_seed"][str(seed)]["aurac"] == pytest.approx(aurac(list(ANSWERED_RANKS), curve))
        assert entry["per_rank"] == pytest.approx([sum(v) / len(v) for v in zip(*curves.values())])
        assert entry["aurac"] == pytest.approx(sum(aurac(list(ANSWERED_RANKS), c) for c in curves.values()) / 2)


def test_compare_tables_answers_that_can_be_right(answered):
    """compare.json holds, per method, seed and rank, the exact_match_strict computed from the saved adapters without
    the evaluation code (non-zero, different per rank and seed), their means over seeds and AURACs, and the base
    model's.

    Fails if rank_metrics scores completion i against item i + 1, or if aggregate tabulates the first seed's curve
    for every seed."""
    assert run_answered(answered["base_dir"], answered["out"], answered["task"]) == 0  # reuses runs and evaluations
    check_table(answered, "exact_match_strict")


@pytest.mark.parametrize("metric", ["exact_match_flexible", "token_acc"])
def test_compare_tabulates_another_metric_of_answers_that_can_be_right(answered, metric, capsys):
    """--metric tabulates that metric of the same evaluations: the expected exact_match_flexible or token_acc per
    method, seed and rank (each differs from exact_match_strict somewhere).

    Fails if _metric_value tabulates the primary metric (exact_match_strict) whatever --metric asks."""
    assert run_answered(answered["base_dir"], answered["out"], answered["task"], "--metric", metric) == 0
    assert "reusing finished ranks pretrained, 1, 2, 4" in capsys.readouterr().out
    check_table(answered, metric)


def test_compare_score_only_tables_token_acc_of_answers_that_can_be_right(answered):
    """--score_only tabulates token_acc from RUN_DIR/eval-score: the expected token_acc per method, seed and rank.

    Fails if a score_only pass gives every rank the first rank's scores."""
    assert run_answered(answered["base_dir"], answered["out"], answered["task"], "--score_only") == 0
    check_table(answered, "token_acc")
    for m in ANSWERED_METHODS:
        for seed in ANSWERED_SEEDS:
            assert (answered["out"] / m / f"seed-{seed}" / "eval-score" / "eval.json").is_file()
