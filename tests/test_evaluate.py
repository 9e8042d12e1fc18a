"""The eval command end to end on a tiny random Llama: outputs, resuming, stacked == sequential, bad input; and on a
tiny Llama set by hand to answer gsm8k prompts (`answering_base`), whose metrics are checked against values computed
here without the evaluation code."""
import contextlib
import json
import os
import re
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, use_rank
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


def random_adapter(base_dir, rank=8, seed=0, scale=0.5, **config):
    """A matryoshka model on the base model in ``base_dir`` with random non-zero lora_B (scale · N(0, 1)), so every
    rank differs (``config``: more MatryoshkaConfig settings)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # lora_A's initialisation: the same adapter whatever ran before
        model = get_matryoshka_model(base, MatryoshkaConfig(rank=rank, method="matryoshka", **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def make_run(tiny_llama_dir, run_dir, rank=8, data="arithmetic", seed=0, scale=0.5, model=None):
    """A run folder as `train` writes it, with random non-zero lora_B so every rank differs (or ``model``'s adapter,
    a ``random_adapter`` on the base model in ``tiny_llama_dir``)."""
    model = model if model is not None else random_adapter(tiny_llama_dir, rank, seed, scale)
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


# Answers that can be right. A random model never writes "#### N": on it every exact match is 0 at every rank, so a
# metric test compares zeros (scoring completion i against item j, or reporting the wrong metric, would pass).
# `answering_base` is a tiny Llama set by hand to answer gsm8k prompts with a number; the expected values are computed
# here without the evaluation code: plain, unbatched `model.generate` and forwards under `use_rank`, and lm-eval's gsm8k
# filters written as the regexes of its gsm8k.yaml.

GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml's generation_kwargs.until
STRICT_MATCH = r"#### (\-?[0-9\.\,]+)"  # gsm8k.yaml's strict-match regex (first match)
FLEXIBLE_EXTRACT = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # gsm8k.yaml's flexible-extract regex (last match)
INVALID = "[invalid]"
MARGIN = 1e-3  # every greedy choice the expected values rest on wins by this much: no rounding can flip it
# the answering model writes the digit a question holds most often (larger on a tie); a question full of one digit
# gets no " ####" (strict-match finds nothing, flexible-extract does); a random adapter changes some answers by rank
QUESTIONS = ["Tom has 3 apples and buys 3 more. How many apples?", "A pen costs 2 dollars. How much do 5 pens cost?",
             "Anna reads 12 pages a day for 3 days. How many?", "Ben had 20 cards and gave away 8. How many are left?",
             "What is 3 times 33?", "Is 5 + 55 equal to 60?", "Sam has 8 books and gets 17 more. How many?",
             "Maria has 18 cards and gets 3 more. How many?", "Ben has 5 toys and gets 4 more. How many?"]
ANSWER_RANK = 2  # the rank whose answers become the references (all but the last, whose answer no rank writes)
ANSWERING_RANKS = [0, 1, 2, 4, 8]
ANSWER_TOKENS = 6


def answering_base(tokenizer_dir, out_dir, gain=5.0, bigram=8.0, hashes=4.0):
    """A tiny Llama, set by hand (no training), that answers gsm8k prompts; saved with the tokenizer in ``out_dir``.

    After "...Answer:" it writes " #### d\\nd\\n...", d being the digit the prompt holds most often (the larger on a
    tie), and leaves out " ####" when one digit fills the prompt. How: every token keeps its own dimensions (":",
    " ####", " ", "\\n", "a digit", and one per digit); the first attention layer attends evenly to every earlier
    token (q = k = 0) and its values and output copy the per-digit dimensions, so they hold each digit's share of the
    context (times ``gain``); the second layer's attention and both MLPs are off; the untied output layer is a
    bigram table ":" -> " ####" -> " " -> digit -> "\\n" -> digit (weight ``bigram``, ``hashes`` for " ####"), whose
    digit rows also read the digit shares. An adapter with random lora_B moves the shares: some ranks change some
    answers.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    colon, hash_token, space, *digits, newline = tokenizer(": #### 0123456789\n", add_special_tokens=False)["input_ids"]
    assert len(digits) == 10 and tokenizer.decode([hash_token]) == " ####" and tokenizer.decode([space]) == " "
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    digit_dim = 5  # dimensions 0..4: ":", " ####", " ", "\n", any digit; 5..14: one per digit; 15..31: other tokens
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, :digit_dim + 10] = 0
        head[:, :digit_dim + 10] = 0
        for dim, token in enumerate((colon, hash_token, space, newline)):
            emb[token] = 0
            emb[token, dim] = 1
        for d, token in enumerate(digits):
            emb[token] = 0
            emb[token, 4] = emb[token, digit_dim + d] = 1
        for token in (hash_token, space, newline, *digits):
            head[token] = 0
        head[hash_token, 0], head[space, 1], head[newline, 4] = hashes, bigram, bigram
        for d, token in enumerate(digits):
            head[token, 2] = head[token, 3] = bigram
            head[token, digit_dim + d] = 1 + 0.05 * d  # the larger digit wins a tie
        attention = model.model.layers[0].self_attn
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            proj.weight.zero_()
        for d in range(10):  # value d: kv head 0 holds 0..7 (read by heads 0, 1), kv head 1 holds 8, 9 (heads 2, 3)
            attention.v_proj.weight[d, digit_dim + d] = 1
            attention.o_proj.weight[digit_dim + d, d if d < 8 else 16 + d - 8] = gain
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def at_rank(model, k):
    """Run the model at rank k; 0: the base model, adapter off (or a model without an adapter as it is)."""
    if k == 0:
        return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    return use_rank(model, k)


def greedy_answer(model, tokenizer, prompt, k, max_new_tokens):
    """(completion, smallest gap between the top two logits over the steps): plain unbatched greedy ``generate`` at
    rank k, decoded without special tokens and cut at the gsm8k stops (lm-eval's ``split(stop)[0]``)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad(), at_rank(model, k):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values  # (steps, 2)
    text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    for stop in GSM8K_UNTIL:
        text = text.split(stop)[0]
    return text, float((top2[:, 0] - top2[:, 1]).min())


def gsm8k_numbers(completion):
    """(strict-match, flexible-extract) of one completion: gsm8k.yaml's two regex filters, "[invalid]" for none."""
    strict = re.findall(STRICT_MATCH, completion)
    flexible = [next(g for g in groups if g) for groups in re.findall(FLEXIBLE_EXTRACT, completion)]
    return (strict[0].strip() if strict else INVALID), (flexible[-1].strip() if flexible else INVALID)


def teacher_forced(model, tokenizer, context, continuation, k):
    """(tokens of the continuation greedy decoding picks, its tokens, smallest gap between the target's logit and the
    best other one) by one plain forward at rank k; the continuation's tokens are split off the whole, as lm-eval's."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    target = torch.tensor(whole[len(context_ids):])
    with torch.no_grad(), at_rank(model, k):
        logits = model(input_ids=torch.tensor([whole])).logits[0, len(context_ids) - 1:-1]  # (C, V)
    own = logits.gather(-1, target[:, None])[:, 0]
    best_other = logits.scatter(-1, target[:, None], float("-inf")).max(-1).values
    return int((logits.argmax(-1) == target).sum()), len(target), float((own - best_other).abs().min())


def answers_of(completions):
    """The number each completion answers with: strict-match's, else flexible-extract's (None: neither)."""
    out = []
    for text in completions:
        strict, flexible = gsm8k_numbers(text)
        out.append(strict if strict != INVALID else flexible if flexible != INVALID else None)
    return out


def gsm8k_prompt(question):
    return f"Question: {question}\nAnswer:"  # gsm8k.yaml's doc_to_text


def greedy_answers(model, tokenizer, questions, ranks, max_new_tokens=ANSWER_TOKENS):
    """{rank: [completion of each question's zero-shot gsm8k prompt]} by ``greedy_answer``; every greedy choice must
    win by ``MARGIN``."""
    out, gaps = {}, []
    for k in ranks:
        answers = [greedy_answer(model, tokenizer, gsm8k_prompt(q), k, max_new_tokens) for q in questions]
        out[k] = [text for text, _ in answers]
        gaps += [gap for _, gap in answers]
    assert min(gaps) > MARGIN, f"a greedy choice wins by only {min(gaps):.2g}: rounding could flip it"
    return out


def expected_gsm8k(model, tokenizer, rows, completions):
    """{rank: {"completions", "exact_match_strict", "exact_match_flexible", "token_acc"}} of question/answer ``rows``
    (zero-shot prompts, references " " + answer) from ``completions`` ({rank: [completion per row]}, from
    ``greedy_answers``), computed without the evaluation code.

    The numbers here are plain digit strings, on which gsm8k's exact_match normalisation (drop ",", "$", a final
    ".", everything up to "#### ", lower-case) is the identity, so a match is string equality with the reference's
    final number. Every teacher-forced choice must win (or lose) by ``MARGIN``.
    """
    golds = [row["answer"].split("#### ")[-1] for row in rows]
    assert all(g.isdigit() for g in golds)
    out, gaps = {}, []
    for k, texts in completions.items():
        numbers = [gsm8k_numbers(t) for t in texts]
        assert all(n == INVALID or n.isdigit() for pair in numbers for n in pair), numbers
        forced = [teacher_forced(model, tokenizer, gsm8k_prompt(row["question"]), " " + row["answer"], k)
                  for row in rows]
        gaps += [gap for _, _, gap in forced]
        out[k] = {"completions": texts,
                  "exact_match_strict": sum(s == g for (s, _), g in zip(numbers, golds)) / len(rows),
                  "exact_match_flexible": sum(f == g for (_, f), g in zip(numbers, golds)) / len(rows),
                  "token_acc": sum(hits for hits, _, _ in forced) / sum(n for _, n, _ in forced)}
    assert min(gaps) > MARGIN, f"a teacher-forced choice is decided by only {min(gaps):.2g}: rounding could flip it"
    return out


def answering_task(model, tokenizer, folder, questions=QUESTIONS, answer_rank=ANSWER_RANK, ranks=ANSWERING_RANKS):
    """A gsm8k task folder (test.jsonl) whose references are the numbers ``model`` answers with at ``answer_rank``,
    except the last question's (its true sum, 9, which no rank writes); and its expected values at ``ranks``."""
    completions = greedy_answers(model, tokenizer, questions, ranks)
    numbers = answers_of(completions[answer_rank])
    assert None not in numbers, completions[answer_rank]
    rows = [{"question": q, "answer": f"#### {n}"} for q, n in zip(questions[:-1], numbers)]
    rows.append({"question": questions[-1], "answer": "#### 9"})
    os.makedirs(folder, exist_ok=True)
    write_jsonl(os.path.join(folder, "test.jsonl"), rows)
    return {"task": str(folder), "rows": rows, "expected": expected_gsm8k(model, tokenizer, rows, completions)}


def check_answerable(expected, answer_rank=ANSWER_RANK):
    """The expected values can catch a wrong metric: non-zero at ``answer_rank``, and not the same everywhere."""
    at = expected[answer_rank]
    assert at["exact_match_strict"] > 0 and at["exact_match_flexible"] > 0 and at["token_acc"] > 0
    assert len(set(at["completions"])) >= 4  # the items' answers differ: item i scored against item j would show
    assert any(e["exact_match_strict"] != e["exact_match_flexible"] for e in expected.values())
    for metric in ("exact_match_strict", "exact_match_flexible", "token_acc"):
        assert len({e[metric] for e in expected.values()}) > 1, metric  # some rank differs


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




def answering_setup(tokenizer_dir, d):
    """In folder ``d``: a run (rank 8) on ``answering_base`` with a random adapter; that model in memory (eager
    attention, as eval loads it), its tokenizer, and a gsm8k task folder whose references are its answers at
    ANSWER_RANK, with the expected values at every rank of ANSWERING_RANKS."""
    base_dir = answering_base(tokenizer_dir, d / "base")
    model = random_adapter(base_dir, rank=8, seed=5, scale=0.15)
    run = make_run(base_dir, d / "run", model=model)
    model.get_base_model().set_attn_implementation("eager")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    task = answering_task(model, tokenizer, d / "task")
    check_answerable(task["expected"])
    return dict(task, base_dir=base_dir, run_dir=run, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def answering(smol_tokenizer_dir, tmp_path_factory):
    return answering_setup(smol_tokenizer_dir, tmp_path_factory.mktemp("answering"))


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


def test_eval_cli_scores_answers_that_can_be_right(answering, tmp_path):
    """At every rank (and the base model), eval's completions and exact_match_strict, exact_match_flexible and
    token_acc are those computed here without the evaluation code, on references that are the model's own answers
    at one rank: non-zero there, other values at other ranks, strict != flexible.

    Fails if rank_metrics scores completion i against item i + 1, or swaps the strict and flexible filters; if
    generate_at_ranks hands a rank another rank's completions; or if score_at_ranks gives a rank another rank's
    scores (token_acc)."""
    out = tmp_path / "eval"
    code = cli_main(["eval", answering["run_dir"], "--task", answering["task"], "--ranks", "1,2,4,8",
                     "--output_dir", str(out)] + FAST)
    assert code == 0
    expected, ranks = answering["expected"], [1, 2, 4, 8]
    result = read(out / "eval.json")
    assert result["kind"] == "gsm8k" and result["metric"] == "exact_match_strict"
    metrics = {r["rank"]: r["metrics"] for r in result["per_rank"]} | {0: result["pretrained_metrics"]}
    for k, want in expected.items():
        assert {m: metrics[k][m] for m in ("exact_match_strict", "exact_match_flexible", "token_acc")} == \
            {m: want[m] for m in ("exact_match_strict", "exact_match_flexible", "token_acc")}, k
        samples = read(out / "ranks" / ("pretrained.json" if k == 0 else f"rank-{k}.json"))["samples"]
        assert [s["completion"] for s in samples] == want["completions"], k
        assert [(s["strict"], s["flexible"]) for s in samples] == [gsm8k_numbers(t) for t in want["completions"]]
    values = [expected[k]["exact_match_strict"] for k in ranks]
    assert [r["value"] for r in result["per_rank"]] == values
    assert result["pretrained"] == expected[0]["exact_match_strict"]
    assert result["aurac"] == pytest.approx(aurac(ranks, values))


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


def test_score_only_token_acc_of_answers_that_can_be_right(answering, tmp_path):
    """score_only's token_acc at every rank (and the base model's) is the share of reference tokens that a plain
    forward's argmax gets right, computed here: non-zero and rank-dependent, the references being the model's own
    answers at one rank.

    Fails if score_at_ranks counts greedy hits one position off, or if a score_only pass gives every rank the first
    rank's scores."""
    result = evaluate_run(answering["run_dir"], task=answering["task"], ranks=[1, 2, 4, 8], score_only=True,
                          batch_size=2, output_dir=str(tmp_path / "score"), progress=False)
    expected = answering["expected"]
    assert result["metric"] == "token_acc"
    assert result["pretrained"] == result["pretrained_metrics"]["token_acc"] == expected[0]["token_acc"]
    assert [r["value"] for r in result["per_rank"]] == [expected[k]["token_acc"] for k in (1, 2, 4, 8)]
    assert all(r["value"] == r["metrics"]["token_acc"] and "exact_match_strict" not in r["metrics"]
               for r in result["per_rank"])


def test_score_only_on_an_lm_eval_task_exits_2(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = cli_main(["eval", run_dir, "--task", "lm-eval:gsm8k", "--score_only", "--output_dir", str(out)] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "--score_only" in err and "lm-eval" in err and "Traceback" not in err
    assert not out.exists()
