"""The eval command end to end on a tiny random Llama: outputs, resuming, stacked == sequential, bad input."""
import json
import os
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model
from matryoshka_lora.cli import main as cli_main
from matryoshka_lora.evaluation import evaluate_run
from matryoshka_lora.evaluation.results import log_aurac_allowed
from matryoshka_lora.report import markdown_table
from matryoshka_lora.ranks import aurac, log_aurac


pytestmark = pytest.mark.usefixtures("one_thread")

GSM_ROWS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "He has 3 + 4 = 7 apples.\n#### 7"),
    ("A pen costs 2 dollars. How much do 5 pens cost?", "They cost 5 * 2 = 10 dollars.\n#### 10"),
    ("Anna reads 12 pages a day for 3 days. How many pages?", "She reads 12 * 3 = 36 pages.\n#### 36"),
    ("Ben had 20 cards and gave away 8. How many are left?", "He has 20 - 8 = 12 cards.\n#### 12"),
    ("A box holds 6 eggs. How many eggs are in 4 boxes?", "There are 6 * 4 = 24 eggs.\n#### 24"),
]


def make_run(tiny_llama_dir, run_dir, rank=8, data="arithmetic", seed=0):
    """A run folder as `train` writes it, with random non-zero lora_B so every rank differs."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_matryoshka_model(base, MatryoshkaConfig(rank=rank, method="matryoshka"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(run_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(run_dir)
    with open(os.path.join(run_dir, "train_config.yaml"), "w") as f:
        yaml.safe_dump({"model": tiny_llama_dir, "model_path": tiny_llama_dir, "data": data, "seed": seed}, f)
    return str(run_dir)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory):
    return make_run(tiny_llama_dir, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def gsm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gsm")
    rows = [{"question": q, "answer": a} for q, a in GSM_ROWS]
    write_jsonl(d / "test.jsonl", rows[:3])
    write_jsonl(d / "train.jsonl", rows[3:])
    return str(d)




FAST = ["--max_new_tokens", "6", "--batch_size", "2", "--no_progress"]


def read(path):
    with open(path) as f:
        return json.load(f)


def test_eval_cli_end_to_end(run_dir, gsm_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli_main(["eval", run_dir, "--task", gsm_dir, "--shots", "1", "--ranks", "1,2,4,8",
                     "--output_dir", str(out), "--stop", "\\n\\n"] + FAST)
    assert code == 0
    result = read(out / "eval.json")
    assert result["settings"]["stop"] == ["\n\n"]
    assert result["task"] == gsm_dir and result["metric"] == "exact_match_strict" and result["kind"] == "gsm8k"
    assert [r["rank"] for r in result["per_rank"]] == [1, 2, 4, 8]
    assert all(r["n"] == 3 and r["seconds"] >= 0 for r in result["per_rank"])
    for r in result["per_rank"] + [{"metrics": result["pretrained_metrics"]}]:
        m = r["metrics"]
        assert {"exact_match_strict", "exact_match_flexible", "loss", "ppl", "token_acc"} <= set(m)
        assert m["ppl"] == pytest.approx(torch.tensor(m["loss"]).exp().item(), rel=1e-5)
    values = [r["value"] for r in result["per_rank"]]
    assert result["aurac"] == pytest.approx(aurac([1, 2, 4, 8], values))
    assert result["log_aurac"] == pytest.approx(log_aurac([1, 2, 4, 8], values))
    # the adapter changes the answers' likelihood at every rank, and differently per rank
    losses = [r["metrics"]["loss"] for r in result["per_rank"]] + [result["pretrained_metrics"]["loss"]]
    assert len(set(losses)) == 5
    md = (out / "eval.md").read_text()
    assert "| Adapter | PT | 1 | 2 | 4 | 8 | AURAC | log-AURAC |" in md
    assert (out / "rank_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = read(out / "ranks" / "rank-2.json")["samples"]
    assert len(samples) == 3 and all({"completion", "strict", "flexible"} <= set(s) for s in samples)
    assert "| matryoshka (R=8) |" in capsys.readouterr().out


def test_stacked_equals_sequential(run_dir, gsm_dir, tmp_path):
    kwargs = dict(task=gsm_dir, ranks=[1, 2, 8], max_new_tokens=8, batch_size=2, progress=False)
    stacked = evaluate_run(run_dir, output_dir=str(tmp_path / "a"), stacked=True, **kwargs)
    sequential = evaluate_run(run_dir, output_dir=str(tmp_path / "b"), stacked=False, **kwargs)
    assert [r["metrics"] for r in stacked["per_rank"]] == [r["metrics"] for r in sequential["per_rank"]]
    for k in (1, 2, 8):
        a = read(tmp_path / "a" / "ranks" / f"rank-{k}.json")["samples"]
        b = read(tmp_path / "b" / "ranks" / f"rank-{k}.json")["samples"]
        assert a == b


def test_resume_skips_finished_ranks(run_dir, gsm_dir, tmp_path, monkeypatch):
    import matryoshka_lora.evaluation.backends as ev

    out = str(tmp_path / "eval")
    kwargs = dict(task=gsm_dir, ranks=[1, 4], max_new_tokens=4, batch_size=3, output_dir=out, progress=False)
    first = evaluate_run(run_dir, **kwargs)
    os.remove(os.path.join(out, "ranks", "rank-4.json"))  # as if interrupted before rank 4 finished
    calls = []
    real = ev.generate_at_ranks
    monkeypatch.setattr(ev, "generate_at_ranks", lambda *a, **k: calls.append(list(a[3])) or real(*a, **k))
    again = evaluate_run(run_dir, **kwargs)
    assert calls == [[4]]
    assert [r["metrics"] for r in again["per_rank"]] == [r["metrics"] for r in first["per_rank"]]
    calls.clear()
    evaluate_run(run_dir, **dict(kwargs, max_new_tokens=5))  # other settings: nothing is reused
    assert calls == [[0], [1, 4]]


def test_prompt_completion_and_choice_jsonl(run_dir, tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2 + 2 =", "completion": " 4"},
                                             {"prompt": "The sky is", "completion": " blue"}])
    result = evaluate_run(run_dir, task=pc, ranks=[2, 8], max_new_tokens=3, output_dir=str(tmp_path / "pc"),
                          progress=False)
    assert result["kind"] == "completion" and result["metric"] == "exact_match"
    assert "log_aurac" in result and result["per_rank"][0]["n"] == 2
    mc_rows = [{"prompt": "The color of the sky is", "choices": ["blue", "green", "a banana"], "label": 0},
               {"question": "2 + 2 =", "choices": ["3", "4"], "label": 1},
               {"query": "Cats say", "choices": ["woof", "meow"], "label": 1}]
    mc = write_jsonl(tmp_path / "mc.jsonl", mc_rows)
    result = evaluate_run(run_dir, task=mc, ranks=[1, 2, 3], output_dir=str(tmp_path / "mc"), progress=False)
    assert result["kind"] == "choice" and result["metric"] == "acc"
    assert "log_aurac" not in result  # 3 is not a power of two
    for k in (1, 2, 3):
        record = read(tmp_path / "mc" / "ranks" / f"rank-{k}.json")
        picks = [max(range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__) for s in record["samples"]]
        assert record["metrics"]["acc"] == pytest.approx(sum(p == r["label"] for p, r in zip(picks, mc_rows)) / 3)
        norm = [max(range(len(r["choices"])), key=lambda i: s["loglikelihoods"][i] / len(r["choices"][i]))
                for s, r in zip(record["samples"], mc_rows)]
        assert [s["pred_norm"] for s in record["samples"]] == norm


def test_log_aurac_rule_and_table():
    assert log_aurac_allowed([1, 2, 4, 8]) and not log_aurac_allowed([1, 3]) and not log_aurac_allowed([4])
    result = {"task": "t", "metric": "acc", "method": "matryoshka", "max_rank": 4, "ranks": [1, 4], "shots": 0,
              "pretrained": 0.25, "pretrained_metrics": {"acc": 0.25}, "pretrained_seconds": 1.0,
              "per_rank": [{"rank": 1, "value": 0.5, "n": 4, "seconds": 1.0, "metrics": {"acc": 0.5}},
                           {"rank": 4, "value": 0.75, "n": 4, "seconds": 1.0, "metrics": {"acc": 0.75}}],
              "aurac": 0.625, "log_aurac": 0.625}
    md = markdown_table(result)
    assert "| matryoshka (R=4) | 25.0 | 50.0 | 75.0 | 62.5 | 62.5 |" in md
    assert "| 4 | 0.75 | 4 | 1.0 |" in md


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_bad_adapter_file_exits_2_naming_it(run_dir, gsm_dir, tmp_path, capsys, damage):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("eval"))
    weights = broken / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    out = tmp_path / "out"
    code = cli_main(["eval", str(broken), "--task", gsm_dir, "--output_dir", str(out)] + FAST)
    err = capsys.readouterr().err
    assert code == 2
    assert str(weights) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("args,message", [
    (["--ranks", "1,16"], "outside 1..8"),
    (["--ranks", "one"], "--ranks"),
    (["--limit", "0"], "--limit"),
    (["--task", "nonexistent_task"], "nonexistent_task"),
])
def test_bad_options_exit_2(run_dir, gsm_dir, tmp_path, capsys, args, message):
    argv = ["eval", run_dir, "--task", gsm_dir, "--output_dir", str(tmp_path / "o")] + FAST
    code = cli_main(argv + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_fewshot_prompt_layout(gsm_dir):
    from matryoshka_lora.evaluation.tasks import load_task

    task = load_task(gsm_dir, limit=2, shots=2, fewshot_data=None, fewshot_seed=1234)
    train = {f"Question: {q}\nAnswer: {a}" for q, a in GSM_ROWS[3:]}
    for item, (question, answer) in zip(task["items"], GSM_ROWS):
        *shots, last = item["prompt"].split("\n\n")  # lm-eval: exemplar + "\n\n" + ... + the question
        assert set(shots) == train
        assert last == f"Question: {question}\nAnswer:"
        assert item["target"] == " " + answer and item["answer"] == answer
    assert load_task(gsm_dir, 2, 2, None, 1234) == task  # a seeded draw


def test_fewshot_from_a_file_needs_exemplars(gsm_dir, run_dir, tmp_path, capsys):
    code = cli_main(["eval", run_dir, "--task", os.path.join(gsm_dir, "test.jsonl"), "--shots", "2",
                     "--output_dir", str(tmp_path / "o")] + FAST)
    assert code == 2 and "--fewshot_data" in capsys.readouterr().err


def copy_run(run_dir, to, **config):
    """A copy of the run's folder (no eval results), with some matryoshka_config.json fields changed."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("eval*"))
    path = os.path.join(to, "matryoshka_config.json")
    values = read(path) | config
    with open(path, "w") as f:
        json.dump(values, f)
    return str(to)


def test_eval_under_the_other_inference_rule(run_dir, gsm_dir, tmp_path):
    """--inference prefix on a run saved as "paper" gives what a run saved as "prefix" gives, in eval-prefix/."""
    paper, prefix = copy_run(run_dir, tmp_path / "paper"), copy_run(run_dir, tmp_path / "prefix", inference="prefix")
    kwargs = dict(task=gsm_dir, ranks=[1, 2, 8], max_new_tokens=4, batch_size=3, progress=False)
    read_as = evaluate_run(paper, inference="prefix", **kwargs)
    assert read_as["inference"] == "prefix" and read_as["output_dir"] == os.path.join(paper, "eval-prefix")
    assert os.path.isfile(os.path.join(paper, "eval-prefix", "eval.json"))
    assert not os.path.exists(os.path.join(paper, "eval"))
    saved_as = evaluate_run(prefix, **kwargs)
    assert saved_as["inference"] == "prefix" and saved_as["output_dir"] == os.path.join(prefix, "eval")
    assert [r["metrics"] for r in read_as["per_rank"]] == [r["metrics"] for r in saved_as["per_rank"]]
    own = evaluate_run(paper, **kwargs)  # P = [4, 3, 2, 2, 1, ...] against s_k = 1: every rank's loss differs
    assert own["inference"] == "paper" and own["pretrained_metrics"] == read_as["pretrained_metrics"]
    assert all(a["metrics"]["loss"] != b["metrics"]["loss"] for a, b in zip(own["per_rank"], read_as["per_rank"]))


def test_eval_inference_the_method_cannot_use_exits_2(run_dir, gsm_dir, tmp_path, capsys):
    dylora = copy_run(run_dir, tmp_path / "dylora", method="dylora")
    code = cli_main(["eval", dylora, "--task", gsm_dir, "--inference", "prefix"] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "--inference 'prefix'" in err and "needs method matryoshka or lora" in err
    assert "Traceback" not in err and not os.path.exists(os.path.join(dylora, "eval-prefix"))


def test_score_only_skips_generation_and_keeps_the_full_evaluation(run_dir, gsm_dir, tmp_path, monkeypatch):
    import matryoshka_lora.evaluation.backends as ev

    run = copy_run(run_dir, tmp_path / "run")
    kwargs = dict(task=gsm_dir, ranks=[1, 2, 8], max_new_tokens=4, batch_size=2, progress=False)
    full = evaluate_run(run, **kwargs)
    full_json = os.path.join(run, "eval", "eval.json")
    before = os.path.getmtime(full_json)

    def no_generation(*args, **kw):
        raise AssertionError("score_only generated")

    monkeypatch.setattr(ev, "generate_at_ranks", no_generation)
    scored = evaluate_run(run, score_only=True, **kwargs)
    assert scored["output_dir"] == os.path.join(run, "eval-score") and scored["metric"] == "token_acc"
    assert scored["pretrained"] == full["pretrained_metrics"]["token_acc"]
    for a, b in zip(full["per_rank"], scored["per_rank"]):
        assert b["value"] == a["metrics"]["token_acc"] and b["metrics"]["loss"] == a["metrics"]["loss"]
        assert "exact_match_strict" not in b["metrics"] and "exact_match_strict" in a["metrics"]
    assert os.path.getmtime(full_json) == before  # the full evaluation is not overwritten
    assert evaluate_run(run, score_only=True, **kwargs)["per_rank"] == scored["per_rank"]  # reused, not redone


def test_score_only_on_an_lm_eval_task_exits_2(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = cli_main(["eval", run_dir, "--task", "lm-eval:gsm8k", "--score_only", "--output_dir", str(out)] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "--score_only" in err and "lm-eval" in err and "Traceback" not in err
    assert not out.exists()
