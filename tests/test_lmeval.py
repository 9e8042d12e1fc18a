"""`lm-eval:<task>` offline: custom task YAMLs over local JSONL, cross-checked against our own scoring."""
import json

import pytest

from test_evaluate import ANSWER_TOKENS, GSM_ROWS, answering_setup, gsm8k_numbers, make_run, write_jsonl

pytest.importorskip("lm_eval")

from matryoshka_lora.cli import main as cli_main  # noqa: E402
from matryoshka_lora.evaluation import evaluate_run  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

MC_ROWS = [{"query": "The color of the sky is", "choices": ["blue", "green", "a banana"], "label": 0},
           {"query": "Two plus two is", "choices": ["three", "four"], "label": 1},
           {"query": "Cats say", "choices": ["woof", "meow", "moo"], "label": 1},
           {"query": "Ice is", "choices": ["cold", "hot"], "label": 0}]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

# lm-eval's gsm8k.yaml with the data swapped for a local file
GSM_YAML = """task: tiny_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore:
      - ","
      - "\\\\$"
      - "(?s).*#### "
      - "\\\\.$"
generation_kwargs:
  until:
    - "Question:"
    - "</s>"
    - "<|im_end|>"
  do_sample: false
  temperature: 0.0
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
"""




@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory):
    return make_run(tiny_llama_dir, tmp_path_factory.mktemp("run"), seed=3)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    mc = write_jsonl(d / "mc.jsonl", MC_ROWS)
    gsm = write_jsonl(d / "gsm.jsonl", [{"question": q, "answer": a} for q, a in GSM_ROWS[:3]])
    (d / "yaml").mkdir()
    (d / "yaml" / "tiny_mc.yaml").write_text(MC_YAML.format(data=mc))
    (d / "yaml" / "tiny_gsm8k.yaml").write_text(GSM_YAML.format(data=gsm))
    return {"include": str(d / "yaml"), "mc": mc, "gsm": gsm}


@pytest.fixture(scope="module")
def answering(smol_tokenizer_dir, tmp_path_factory):
    """test_evaluate's answering run and gsm8k task (references: its own answers at one rank), and the task's YAML."""
    d = tmp_path_factory.mktemp("answering")
    setup = answering_setup(smol_tokenizer_dir, d)
    (d / "yaml").mkdir()
    yaml_text = GSM_YAML.format(data=str(d / "task" / "test.jsonl")).replace("task: tiny_gsm8k", "task: answers_gsm8k")
    (d / "yaml" / "answers_gsm8k.yaml").write_text(yaml_text)
    return dict(setup, include=str(d / "yaml"))


def recorded_responses(monkeypatch):
    """Patch lm_eval.simple_evaluate to keep, per call (one per rank, in the order run), each doc's raw response."""
    import lm_eval

    calls, real = [], lm_eval.simple_evaluate

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        (samples,) = out["samples"].values()
        calls.append({s["doc_id"]: s["resps"] for s in samples})
        return out

    monkeypatch.setattr(lm_eval, "simple_evaluate", recording)
    return calls


def test_lm_eval_multiple_choice_matches_our_scoring(run_dir, tasks, tmp_path):
    ranks = [1, 8]
    theirs = evaluate_run(run_dir, task="lm-eval:tiny_mc", ranks=ranks, shots=0, include_path=tasks["include"],
                          output_dir=str(tmp_path / "lm"), progress=False)
    rows = [{"prompt": r["query"], "choices": r["choices"], "label": r["label"]} for r in MC_ROWS]
    ours = evaluate_run(run_dir, task=write_jsonl(tmp_path / "mc.jsonl", rows), ranks=ranks,
                        output_dir=str(tmp_path / "ours"), progress=False)
    assert theirs["metric"] == "acc_norm,none"
    for a, b in zip(theirs["per_rank"] + [{"metrics": theirs["pretrained_metrics"]}],
                    ours["per_rank"] + [{"metrics": ours["pretrained_metrics"]}]):
        assert a["metrics"]["acc,none"] == pytest.approx(b["metrics"]["acc"])
        assert a["metrics"]["acc_norm,none"] == pytest.approx(b["metrics"]["acc_norm"])
    assert (tmp_path / "lm" / "eval.md").exists() and theirs["per_rank"][0]["n"] == 4
    # lm-eval really ran each rank: its per-choice log-likelihoods are ours at that rank (and differ by rank)
    seen = []
    for k in [0] + ranks:
        name = "pretrained.json" if k == 0 else f"rank-{k}.json"
        lm = json.loads((tmp_path / "lm" / "ranks" / name).read_text())["samples"]
        mine = json.loads((tmp_path / "ours" / "ranks" / name).read_text())["samples"]
        for a, b in zip(sorted(lm, key=lambda s: s["doc_id"]), mine):
            assert [r[0] for r in a["filtered_resps"]] == pytest.approx(b["loglikelihoods"], abs=1e-3)
        seen.append(mine[0]["loglikelihoods"][0])
    assert len(set(seen)) == 3


def test_lm_eval_gsm8k_filters_match_ours(run_dir, tasks, tmp_path, monkeypatch):
    """The same greedy completions through lm-eval's gsm8k filters and metric and through ours."""
    raw = recorded_responses(monkeypatch)
    common = dict(ranks=[2, 8], max_new_tokens=8, batch_size=3, progress=False)
    theirs = evaluate_run(run_dir, task="lm-eval:tiny_gsm8k", shots=0, include_path=tasks["include"],
                          output_dir=str(tmp_path / "lm"), **common)
    ours = evaluate_run(run_dir, task=tasks["gsm"], output_dir=str(tmp_path / "ours"), **common)
    assert theirs["metric"] == "exact_match,strict-match"
    for a, b in zip(theirs["per_rank"], ours["per_rank"]):
        assert a["metrics"]["exact_match,strict-match"] == b["metrics"]["exact_match_strict"]
        assert a["metrics"]["exact_match,flexible-extract"] == b["metrics"]["exact_match_flexible"]
    # lm-eval's raw responses are our completions, rank by rank (the base model first), and differ by rank
    assert len(raw) == 3
    for k, responses in zip([0, 2, 8], raw):
        name = "pretrained.json" if k == 0 else f"rank-{k}.json"
        mine = json.loads((tmp_path / "ours" / "ranks" / name).read_text())["samples"]
        assert [responses[i] for i in range(len(mine))] == [[[s["completion"]]] for s in mine], k
    assert len({json.dumps(r, sort_keys=True) for r in raw}) == 3


def test_lm_eval_cli_and_unknown_task(run_dir, tasks, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["eval", run_dir, "--task", "lm-eval:tiny_mc", "--include_path", tasks["include"],
                     "--ranks", "2", "--metric", "acc,none", "--output_dir", str(out), "--no_progress"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["metric"] == "acc,none" and [r["rank"] for r in result["per_rank"]] == [2]
    code = cli_main(["eval", run_dir, "--task", "lm-eval:tiny_mcq", "--include_path", tasks["include"],
                     "--output_dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "tiny_mcq" in err and "tiny_mc" in err.split("close names:")[-1]
    assert not (tmp_path / "bad").exists()


def test_lm_eval_gsm8k_answers_that_can_be_right_match_ours_rank_by_rank(answering, tmp_path, monkeypatch):
    """On references that are the model's own answers at one rank, rank by rank (and for the base model):
    lm-eval's raw responses are our completions, its strict-match / flexible-extract responses are our two
    extractions, and its exact_match per filter is ours and the value computed in test_evaluate without either
    (non-zero, rank-dependent, strict != flexible).

    Fails if evaluate_rank runs lm-eval with the adapter at another rank than asked (e.g. use_rank(model, 1)), or if
    rank_metrics scores completion i against item i + 1."""
    raw = recorded_responses(monkeypatch)
    ranks, expected = [2, 8], answering["expected"]
    common = dict(ranks=ranks, max_new_tokens=ANSWER_TOKENS, batch_size=3, progress=False)
    theirs = evaluate_run(answering["run_dir"], task="lm-eval:answers_gsm8k", shots=0,
                          include_path=answering["include"], output_dir=str(tmp_path / "lm"), **common)
    ours = evaluate_run(answering["run_dir"], task=answering["task"], output_dir=str(tmp_path / "ours"), **common)
    assert len(raw) == 3  # one lm-eval run per rank: the base model first, then ranks 2 and 8
    for k, responses in zip([0] + ranks, raw):
        name = "pretrained.json" if k == 0 else f"rank-{k}.json"
        mine = json.loads((tmp_path / "ours" / "ranks" / name).read_text())["samples"]
        assert [s["completion"] for s in mine] == expected[k]["completions"]
        assert [responses[i] for i in range(len(mine))] == [[[s["completion"]]] for s in mine], k  # [request][repeat]
        lm = json.loads((tmp_path / "lm" / "ranks" / name).read_text())["samples"]
        for filter_name, key in (("strict-match", "strict"), ("flexible-extract", "flexible")):
            filtered = sorted((s["doc_id"], s["filtered_resps"]) for s in lm if s["filter"] == filter_name)
            assert [r for _, r in filtered] == [[s[key]] for s in mine], (k, filter_name)
        assert [(s["strict"], s["flexible"]) for s in mine] == [gsm8k_numbers(t) for t in expected[k]["completions"]]
    for k, a, b in [(0, theirs["pretrained_metrics"], ours["pretrained_metrics"])] + \
            [(r["rank"], r["metrics"], q["metrics"]) for r, q in zip(theirs["per_rank"], ours["per_rank"])]:
        assert a["exact_match,strict-match"] == b["exact_match_strict"] == expected[k]["exact_match_strict"], k
        assert a["exact_match,flexible-extract"] == b["exact_match_flexible"] == expected[k]["exact_match_flexible"], k
