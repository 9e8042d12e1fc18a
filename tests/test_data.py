"""Data loading (tasks, JSONL formats, errors) and tokenisation with the loss on the answer only."""
import json

import pytest
from transformers import AutoTokenizer

from matryoshka_lora.data import load_examples
from matryoshka_lora.features import Collator, tokenize_examples
from matryoshka_lora.formats import gsm8k_prompt
from matryoshka_lora.errors import UserError


@pytest.fixture(scope="module")
def tok(smol_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_gsm8k_prompt_matches_lm_eval():
    assert gsm8k_prompt("What is 2+2?") == "Question: What is 2+2?\nAnswer:"


def test_arithmetic_examples_keep_answer(tok):
    ex = load_examples("arithmetic", "test", limit=5, seed=1)
    assert len(ex) == 5
    for e in ex:
        assert e["prompt"].startswith("Question: ") and e["prompt"].endswith("\nAnswer:")
        assert e["completion"] == " " + e["answer"] and "#### " in e["answer"]


def test_jsonl_formats(tmp_path, tok):
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q1", "answer": "A\n#### 3"}])
    assert load_examples(gsm) == [{"prompt": "Question: Q1\nAnswer:", "completion": " A\n#### 3", "answer": "A\n#### 3"}]
    plat = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Do X", "input": "on Y", "output": "Done"},
                                              {"instruction": "Do Z", "input": "", "output": "Ok"}])
    ex = load_examples(plat)
    assert "Do X" in ex[0]["prompt"] and "on Y" in ex[0]["prompt"] and ex[0]["completion"] == "Done"
    assert "### Input" not in ex[1]["prompt"]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "1+1=", "completion": "2"}, "", {"prompt": "a", "completion": "b"}])
    assert load_examples(pc, limit=1) == [{"prompt": "1+1=", "completion": "2"}]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}])
    ex = load_examples(chat, tokenizer=tok)[0]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                   tokenize=False) == ex["prompt"] + ex["completion"]
    assert "hello" in ex["completion"] and "hello" not in ex["prompt"] and "hi" in ex["prompt"]


def test_folder_picks_split_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "train q", "answer": "#### 1"}])
    write_jsonl(tmp_path / "test.jsonl", [{"question": "test q", "answer": "#### 2"}])
    assert "test q" in load_examples(str(tmp_path), "test")[0]["prompt"]


@pytest.mark.parametrize("rows, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '], r"bad\.jsonl:2: malformed JSON"),
    ([{"text": "a"}], r"bad\.jsonl:1: missing columns: found \['text'\]"),
    (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
    ([{"prompt": 3, "completion": "b"}], r"column 'prompt' must be text"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"last message must be the assistant's"),
    ([], r"bad\.jsonl is empty"),
])
def test_bad_jsonl(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows) if rows else str(tmp_path / "bad.jsonl")
    if not rows:
        (tmp_path / "bad.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=message):
        load_examples(path)


def test_unknown_source_suggests():
    with pytest.raises(UserError, match="did you mean 'arithmetic'"):
        load_examples("arithmetc")


def test_labels_mask_prompt_and_append_eos(tok):
    ex = [{"prompt": "Question: 1+1?\nAnswer:", "completion": " 2\n#### 2"}]
    (f,), counts = tokenize_examples(ex, tok, max_length=64)
    p = tok(ex[0]["prompt"])["input_ids"]
    c = tok(ex[0]["completion"], add_special_tokens=False)["input_ids"]
    assert f["input_ids"] == p + c + [tok.eos_token_id]
    assert f["labels"] == [-100] * len(p) + c + [tok.eos_token_id]
    assert counts == dict(examples=1, kept=1, truncated=0, dropped=0, tokens=len(p) + len(c) + 1,
                          label_tokens=len(c) + 1)


def test_truncation_and_drop_are_counted(tok):
    long_prompt = "word " * 50
    ex = [{"prompt": "Q:", "completion": " a long answer " * 20},  # truncated, keeps answer tokens
          {"prompt": long_prompt, "completion": " x"},  # no answer token left: dropped
          {"prompt": "Q:", "completion": "  "},  # empty answer: dropped
          {"prompt": "Q:", "completion": " ok"}]
    features, counts = tokenize_examples(ex, tok, max_length=16)
    assert counts["truncated"] == 2 and counts["dropped"] == 2 and counts["kept"] == 2
    assert all(len(f["input_ids"]) <= 16 for f in features)
    assert all(any(t != -100 for t in f["labels"]) for f in features)


def test_collator_right_pads():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_chat_rows_tokenize_as_the_template_with_loss_on_the_reply(tmp_path, tok):
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    ex = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tokenizer=tok)
    (f,), _ = tokenize_examples(ex, tok, max_length=256)
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert f["input_ids"] == full  # the template's end-of-turn is the EOS: not appended twice
    answer = [t for t, label in zip(f["input_ids"], f["labels"]) if label != -100]
    assert tok.decode(answer).startswith("5") and answer[-2:].count(tok.eos_token_id) == 1
