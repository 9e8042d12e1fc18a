"""Any dataset: local .jsonl/.json/.csv/.parquet files and folders through datasets.load_dataset, every format
(alpaca, sharegpt, messages, prompt/completion, question/answer, text), --data_columns, the chat template with the
loss on every assistant turn, the hub path, bad input as one line, and the examples of 0.1's sources unchanged."""
import json
import os

import pytest
from transformers import AutoTokenizer

from matryoshka_lora import cli
from matryoshka_lora.arithmetic import make_split
from matryoshka_lora.data import load_examples
from matryoshka_lora.features import tokenize_examples
from matryoshka_lora.errors import UserError
from matryoshka_lora.evaluation.run import run_data_options
from matryoshka_lora.evaluation.tasks import load_task

CHAT = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
ROWS = [{"question": "Q1?", "answer": "A\n#### 3"}, {"instruction": "Do X", "input": "on Y", "output": "Done"},
        {"instruction": "Do Z", "input": "", "output": "Ok"}, {"prompt": "1+1=", "completion": "2"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": CHAT}]
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(smol_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def features(examples, tok):
    return tokenize_examples(examples, tok, 256)[0]


# ---------------------------------------------------------------- 0.1's sources give the same examples

# What 0.1 (commit 9b271ab) made of ROWS as a JSONL file with the SmolLM2 tokenizer, written out here.
PINNED_EXAMPLES = [
    {"prompt": "Question: Q1?\nAnswer:", "completion": " A\n#### 3", "answer": "A\n#### 3"},
    {"prompt": "### Instruction:\nDo X\n\n### Input:\non Y\n\n### Response:\n", "completion": "Done"},
    {"prompt": "### Instruction:\nDo Z\n\n### Response:\n", "completion": "Ok"},
    {"prompt": "1+1=", "completion": "2"},
    {"prompt": SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "completion": "hello<|im_end|>\n",
     "chat": True},
    {"prompt": SYSTEM + "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc"
                        "<|im_end|>\n<|im_start|>assistant\n", "completion": "d<|im_end|>\n", "chat": True},
]
_SYS_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
            8182, 2, 198]
PINNED_FEATURES = [
    ([17872, 42, 1606, 33, 47, 198, 21350, 42, 330, 198, 1229, 216, 35, 2], 8),
    ([3757, 20880, 42, 198, 6248, 2273, 198, 198, 3757, 18100, 42, 198, 258, 718, 198, 198, 3757, 14212, 42, 198,
      41462, 2], 20),
    ([3757, 20880, 42, 198, 6248, 1777, 198, 198, 3757, 14212, 42, 198, 24487, 2], 12),
    ([33, 27, 33, 45, 34, 2], 4),
    (_SYS_IDS + [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198, 28120, 2, 198], 31),
    (_SYS_IDS + [1, 4093, 198, 81, 2, 198, 1, 520, 9531, 198, 82, 2, 198, 1, 4093, 198, 83, 2, 198, 1, 520, 9531,
                 198, 84, 2, 198], 44),
]  # (input_ids, number of leading prompt tokens labelled -100; the rest is labelled with itself)


def check_pinned(examples, tok):
    assert examples == PINNED_EXAMPLES
    for f, (ids, n_prompt) in zip(features(examples, tok), PINNED_FEATURES):
        assert f["input_ids"] == ids and f["labels"] == [-100] * n_prompt + ids[n_prompt:]


def test_jsonl_of_the_current_formats_is_unchanged(tmp_path, tok):
    path = tmp_path / "cur.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(ROWS)))
    check_pinned(load_examples(str(path), tokenizer=tok), tok)


def test_folder_of_split_files_is_unchanged(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", [{"question": "test q", "answer": "#### 2"}])
    check_pinned(load_examples(str(tmp_path), "train", tokenizer=tok), tok)
    assert load_examples(str(tmp_path), "test") == [{"prompt": "Question: test q\nAnswer:", "completion": " #### 2",
                                                     "answer": "#### 2"}]


def test_arithmetic_is_unchanged(tok):
    expected = [{"prompt": f"Question: {p['question']}\nAnswer:", "completion": " " + p["answer"],
                 "answer": p["answer"]} for p in make_split("test", 3, 1)]
    examples = load_examples("arithmetic", "test", limit=3, seed=1)
    assert examples == expected
    for e, f in zip(expected, features(examples, tok)):
        p, c = tok(e["prompt"])["input_ids"], tok(e["completion"], add_special_tokens=False)["input_ids"]
        assert f["input_ids"] == p + c + [tok.eos_token_id]
        assert f["labels"] == [-100] * len(p) + c + [tok.eos_token_id]


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from memory: records (args, kwargs) and returns the rows given."""
    import datasets

    calls, tables = [], {}

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] not in tables:
            raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (LocalEntryNotFoundError)\nmore text")
        return datasets.Dataset.from_list(tables[args[0]])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, tables


def test_gsm8k_and_platypus_are_unchanged(fake_hub):
    calls, tables = fake_hub
    tables["openai/gsm8k"] = [{"question": "Q1?", "answer": "A\n#### 3"}]
    tables["garage-bAInd/Open-Platypus"] = [{"instruction": "Do X", "input": "on Y", "output": "Done",
                                             "data_source": "x"}]
    assert load_examples("gsm8k", "test") == PINNED_EXAMPLES[:1]
    assert load_examples("platypus") == PINNED_EXAMPLES[1:2]
    assert calls[0] == (("openai/gsm8k", "main"), {"split": "test"})


# ---------------------------------------------------------------- every format, every file type


def write(path, rows, kind):
    """rows as a .jsonl, .json, .csv or .parquet file."""
    import pandas as pd

    path = str(path) + "." + kind
    if kind == "jsonl":
        return write_jsonl(__import__("pathlib").Path(path), rows)
    if kind == "json":
        open(path, "w").write(json.dumps(rows))
    elif kind == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_flat_formats_in_every_file_type(tmp_path, kind):
    rows = [{"question": "What is 2+2?", "answer": "4\n#### 4"}, {"question": "And 3+3?", "answer": "#### 6"}]
    assert load_examples(write(tmp_path / "qa", rows, kind)) == [
        {"prompt": "Question: What is 2+2?\nAnswer:", "completion": " 4\n#### 4", "answer": "4\n#### 4"},
        {"prompt": "Question: And 3+3?\nAnswer:", "completion": " #### 6", "answer": "#### 6"}]
    alpaca = write(tmp_path / "alpaca", [{"instruction": "Do X", "input": "on Y", "output": "Done", "text": "t"}], kind)
    assert load_examples(alpaca) == PINNED_EXAMPLES[1:2]  # Alpaca's extra 'text' column is not the text format
    pc = write(tmp_path / "pc", [{"prompt": "1+1=", "completion": "2"}], kind)
    assert load_examples(pc, data_format="prompt_completion") == [{"prompt": "1+1=", "completion": "2"}]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_chat_formats_train_every_assistant_turn(tmp_path, tok, kind):
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                   for m in CHAT]}]
    for rows, fmt in (([{"messages": CHAT}], "messages"), (sharegpt, "auto"), (sharegpt, "sharegpt")):
        (e,) = load_examples(write(tmp_path / fmt, rows, kind), tokenizer=tok, data_format=fmt)
        full = tok.apply_chat_template(CHAT, tokenize=False)
        assert "".join(t for t, _ in e["segments"]) == full
        assert [t for t, trained in e["segments"] if trained] == ["b<|im_end|>\n", "d<|im_end|>\n"]
        (f,) = features([e], tok)
        assert f["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]  # no EOS appended twice
        learnt = [t if label != -100 else None for t, label in zip(f["input_ids"], f["labels"])]
        assert tok.decode([t for t in learnt if t is not None]) == "b<|im_end|>\nd<|im_end|>\n"
        assert learnt[-3:] == [84, 2, 198]  # "d", <|im_end|>, "\n"


def test_single_turn_chat_with_an_explicit_format_is_the_pair_it_was(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", ROWS[4:5])
    (e,) = load_examples(path, tokenizer=tok, data_format="messages")
    assert features([e], tok) == features(PINNED_EXAMPLES[4:5], tok)


def test_text_format_trains_every_token(tmp_path, tok):
    path = write(tmp_path / "t", [{"text": "The cat sat."}, {"text": "  "}], "parquet")
    examples = load_examples(path, data_format="text")
    (f,), counts = tokenize_examples(examples, tok, 256)
    ids = tok("The cat sat.")["input_ids"]
    bare = tok("The cat sat.", add_special_tokens=False)["input_ids"]
    assert f["input_ids"] == ids + [tok.eos_token_id]
    n_special = len(ids) - len(bare)
    assert f["labels"] == [-100] * n_special + bare + [tok.eos_token_id]
    assert counts["dropped"] == 1  # the blank row


def test_data_columns_map_other_names(tmp_path):
    path = write(tmp_path / "odd", [{"q": "2+2?", "a": "4", "question": "ignored"}], "csv")
    assert load_examples(path, data_columns={"prompt": "q", "completion": "a"}) == [{"prompt": "2+2?",
                                                                                     "completion": "4"}]
    with pytest.raises(UserError, match=r"odd\.csv row 1: --data_columns names column 'nope', which the data lacks"):
        load_examples(path, data_columns={"prompt": "nope", "completion": "a"})


def test_folder_as_datasets_lays_it_out(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train-00000-of-00001", [{"prompt": "p", "completion": "c"}], "parquet")
    assert load_examples(str(tmp_path)) == [{"prompt": "p", "completion": "c"}]
    with pytest.raises(UserError, match=r"has no test\.jsonl \(nor test\.json, \.csv or \.parquet; datasets: "):
        load_examples(str(tmp_path), "test")


def test_hub_dataset_is_one_load_dataset_call(fake_hub):
    calls, tables = fake_hub
    tables["tatsu-lab/alpaca"] = [{"instruction": "Do X", "input": "on Y", "output": "Done", "text": "x"}] * 3
    assert load_examples("tatsu-lab/alpaca", "train[:2]", limit=1) == PINNED_EXAMPLES[1:2]
    assert calls[-1] == (("tatsu-lab/alpaca", None), {"split": "train[:2]"})
    load_examples("tatsu-lab/alpaca", data_config="default")
    assert calls[-1] == (("tatsu-lab/alpaca", "default"), {"split": "train"})
    with pytest.raises(UserError) as e:
        load_examples("nobody/nothing", "train_sft")
    assert str(e.value).startswith("cannot load nobody/nothing (train_sft) from the hub (Couldn't reach") and \
        "\n" not in str(e.value)


def test_hub_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^cannot load nobody-here/no-such-data \(train\) from the hub \(.*\); "
                                        r"check the id") as e:
        load_examples("nobody-here/no-such-data")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- bad input: one line naming the row


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"prompt": "a"}], "prompt_completion",
     r"x\.jsonl:1: missing columns for --data_format prompt_completion: expected prompt, completion, found \['prompt'\]"),
    ([{"conversations": []}], "auto", r"x\.jsonl:1: 'conversations' must be a non-empty list"),
    ([{"messages": []}], "messages", r"x\.jsonl:1: 'messages' must be a non-empty list"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}], "auto",
     r"x\.jsonl:1: the conversation has no assistant turn; the last message must be the assistant's"),
    ([{"conversations": [{"from": "alien", "value": "hi"}]}], "auto", r"x\.jsonl:1: conversations: unknown speaker"),
    ([{"text": "a"}], "auto", r"x\.jsonl:1: missing columns: found \['text'\].*give --data_format text"),
    ([{"prompt": "a", "completion": "b"}], "alpacca", r"data_format='alpacca' is not valid; choose one of auto"),
])
def test_bad_rows(tmp_path, tok, rows, fmt, message):
    with pytest.raises(UserError, match=message) as e:
        load_examples(write_jsonl(tmp_path / "x.jsonl", rows), tokenizer=tok, data_format=fmt)
    assert "\n" not in str(e.value)


def test_chat_without_a_template(tmp_path, smol_tokenizer_dir):
    bare = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(UserError, match=r"c\.jsonl:1: messages rows are chat data, rendered by the tokenizer's chat "
                                        r"template, and this model's tokenizer has none"):
        load_examples(path, tokenizer=bare, data_format="messages")
    (e,) = load_examples(path, tokenizer=bare)  # auto-detected messages keep 0.1's plain fallback
    assert e == {"prompt": "user: a\nassistant: b\nuser: c\nassistant:", "completion": " d"}


def test_missing_file_with_an_extension(tmp_path):
    with pytest.raises(UserError, match=r"data file .*nope\.parquet not found"):
        load_examples(str(tmp_path / "nope.parquet"))


@pytest.mark.parametrize("argv, message", [
    (["--data_format", "sharegtp"], "data_format='sharegtp' is not valid; choose one of auto, alpaca, sharegpt"),
    (["--data_columns", "prompt"], "data_columns='prompt' is not valid; give format=column pairs"),
    (["--data", "{tmp}/chat.jsonl", "--data_format", "text"], "chat.jsonl:1: missing columns for --data_format text"),
    (["--data", "{tmp}/chat.jsonl", "--data_format", "sharegpt"], "missing columns for --data_format sharegpt"),
])
def test_bad_input_through_train(argv, message, tmp_path, tiny_llama_dir, capsys):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli.main(["train", "--model", tiny_llama_dir, *argv, "--max_steps", "1", "--output_dir", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("matryoshka-lora train: error: ") and message in lines[0], err
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------- training and evaluation read the run's data keys


def test_train_on_sharegpt_parquet_and_evaluate_its_eval_split(tmp_path, tiny_llama_dir, capsys):
    import yaml

    turns = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train_sft", [{"conversations": turns}] * 4, "parquet")
    write(folder / "dev", [{"conversations": turns}] * 2, "parquet")
    out = str(tmp_path / "run")
    rc = cli.main(["train", "--model", tiny_llama_dir, "--data", str(folder), "--data_split", "train_sft",
                   "--eval_split", "dev", "--max_steps", "1", "--batch_size", "2", "--save_steps", "0",
                   "--rank", "2", "--output_dir", out])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "4 of 4 examples kept" in stdout
    saved = yaml.safe_load(open(os.path.join(out, "train_config.yaml")))
    assert saved["data_split"] == "train_sft" and saved["data_format"] == "auto" and saved["data_columns"] is None
    options = run_data_options(saved)
    assert options == {"data_split": "train_sft", "eval_split": "dev"}
    task = load_task(saved["data"], None, 1, None, 1234, options)
    assert task["kind"] == "completion" and len(task["items"]) == 2
    assert task["items"][0]["target"] == " 4" and task["items"][0]["prompt"].endswith("user: 2+2?\nassistant:")


def test_old_run_configs_read_their_data_as_before():
    old = {"data": "arithmetic", "model": "smollm2", "method": "dylora"}  # 0.1's train_config.yaml: no data keys
    assert run_data_options(old) is None
    assert run_data_options(dict(old, data_split="train", eval_split="test", data_format="auto")) is None
