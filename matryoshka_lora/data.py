"""Training data: named tasks or JSONL files as prompt/completion pairs, tokenized with the loss on the answer only.

Sources (``data``):
    "arithmetic"            the built-in seeded generator (offline)
    "gsm8k"                 hub ``openai/gsm8k`` (config ``main``); prompt ``Question: {q}\\nAnswer:`` as lm-eval
    "platypus"              hub ``garage-bAInd/Open-Platypus``
    a .jsonl file           rows of question/answer (GSM8K), instruction/input/output (Platypus),
                            prompt/completion, or chat ``messages``
    a folder                ``{split}.jsonl`` inside it
"""
import difflib
import json
import os

import torch

from .arithmetic import make_split
from .errors import UserError

TASKS = ("arithmetic", "gsm8k", "platypus")
GSM8K_HUB = ("openai/gsm8k", "main")
PLATYPUS_HUB = "garage-bAInd/Open-Platypus"
ARITHMETIC_SIZES = {"train": 2000, "test": 200}  # when no limit is given
FORMATS = "question/answer, instruction/input/output, prompt/completion or messages"


def gsm8k_prompt(question: str) -> str:
    """The prompt of lm-eval's gsm8k task, so training and evaluation agree."""
    return f"Question: {question}\nAnswer:"


def gsm8k_completion(answer: str) -> str:
    return " " + answer


def platypus_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style template Open-Platypus was trained with."""
    if input_text and input_text.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def load_examples(data: str, split: str = "train", limit: int | None = None, tokenizer=None,
                  seed: int = 0) -> list[dict]:
    """Prompt/completion pairs from a task name or a file.

    Args:
        data: "arithmetic", "gsm8k", "platypus", a JSONL file, or a folder holding ``{split}.jsonl``.
        split: "train" or "test" (hub split name for hub data).
        limit: keep the first ``limit`` examples (arithmetic: generate that many).
        tokenizer: used for its chat template on ``messages`` rows.
        seed: the arithmetic generator's seed.

    Returns:
        A list of {"prompt", "completion"} dicts; GSM8K-style rows also keep the raw "answer" (ending ``#### N``).

    Raises:
        UserError: unknown source, malformed JSONL (``file:line``), missing columns, or no examples.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit={limit!r} is not valid; give a positive integer or nothing for all examples")
    if not isinstance(data, str) or not data:
        raise UserError(f"data={data!r} is not valid; choose {', '.join(TASKS)}, a .jsonl file or a folder")
    path = os.path.expanduser(data)
    if os.path.isdir(path):
        path = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise UserError(f"data folder {data} has no {split}.jsonl")
    if os.path.isfile(path):
        rows = read_jsonl(path, limit)
        examples = [to_example(row, f"{path}:{line}", tokenizer) for line, row in rows]
        source = path
    elif data == "arithmetic":
        try:
            problems = make_split(split, limit or ARITHMETIC_SIZES.get(split, 1000), seed)
        except ValueError as e:
            raise UserError(str(e)) from None
        examples = [to_example(p, "arithmetic", tokenizer) for p in problems]
        source = "arithmetic"
    elif data in ("gsm8k", "platypus"):
        examples = [to_example(row, data, tokenizer) for row in _hub_rows(data, split, limit)]
        source = data
    else:
        close = difflib.get_close_matches(data, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"data={data!r} is neither a task ({', '.join(TASKS)}) nor an existing file or folder{hint}")
    if not examples:
        raise UserError(f"data {source} ({split}) holds no examples")
    return examples[:limit] if limit else examples


def read_jsonl(path: str, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; malformed lines are reported as ``file:line``."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise UserError(f"{path} is empty: no JSON lines to train on")
    return rows


def _hub_rows(task: str, split: str, limit: int | None):
    from datasets import load_dataset  # seconds to import, and only hub data needs it

    try:
        if task == "gsm8k":
            ds = load_dataset(*GSM8K_HUB, split=split)
        else:
            ds = load_dataset(PLATYPUS_HUB, split="train" if split == "train" else split)
    except Exception as e:  # datasets raises many types offline (ConnectionError, DatasetNotFoundError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        local = "a local JSONL with question/answer" if task == "gsm8k" else "a local JSONL with instruction/input/output"
        raise UserError(f"cannot load {task} ({split}) from the hub ({first}); give --data {local} "
                        f"(e.g. path/to/{split}.jsonl), or connect to the hub") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def to_example(row: dict, where: str, tokenizer=None) -> dict:
    """One row (any supported format) as {"prompt", "completion"} (plus "answer" for GSM8K-style rows).

    Raises:
        UserError: the row has none of the supported column sets, or a column is not text.
    """
    if "question" in row and "answer" in row:
        q, a = _text(row, "question", where), _text(row, "answer", where)
        return {"prompt": gsm8k_prompt(q), "completion": gsm8k_completion(a), "answer": a}
    if "instruction" in row and "output" in row:
        instruction, output = _text(row, "instruction", where), _text(row, "output", where)
        input_text = _text(row, "input", where) if row.get("input") is not None else ""
        return {"prompt": platypus_prompt(instruction, input_text), "completion": output}
    if "prompt" in row and "completion" in row:
        return {"prompt": _text(row, "prompt", where), "completion": _text(row, "completion", where)}
    if "messages" in row:
        return chat_example(row["messages"], where, tokenizer)
    raise UserError(f"{where}: missing columns: found {sorted(row)}, expected {FORMATS}")


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: column {key!r} must be text, got {type(value).__name__}")
    return value


def chat_example(messages, where: str, tokenizer=None) -> dict:
    """A chat as prompt (all turns before the last, ready for the assistant) and completion (the last turn).

    The tokenizer's chat template is used when it has one; the template's own end-of-turn text stays in
    the completion so the model learns to stop.
    """
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's (the completion to learn), "
                        f"got role {messages[-1]['role']!r}")
    history, last = messages[:-1], messages[-1]["content"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return {"prompt": prompt, "completion": full[len(prompt):], "chat": True}
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"
    return {"prompt": prompt, "completion": " " + last}


def tokenize_examples(examples: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Token ids with labels on the completion only (prompt tokens -100), EOS appended.

    Over-long examples are cut to ``max_length`` (counted); examples left with no completion token, or
    with an empty completion, are dropped (counted).

    Returns:
        (features, counts): features are {"input_ids", "labels"} lists; counts has
        "examples", "kept", "truncated", "dropped", "tokens" (kept tokens) and "label_tokens".
    """
    eos = tokenizer.eos_token_id
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=True)["input_ids"]
    if any(e.get("chat") for e in examples):  # a chat template writes its own BOS
        bare = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
        prompts = [b if e.get("chat") else p for e, p, b in zip(examples, prompts, bare)]
    completions = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
    features, counts = [], dict(examples=len(examples), kept=0, truncated=0, dropped=0, tokens=0, label_tokens=0)
    for e, p, c in zip(examples, prompts, completions):
        if not e["completion"].strip():
            counts["dropped"] += 1
            continue
        if eos is not None and not (e.get("chat") and eos in c[-2:]):  # chat templates may end the turn already
            c = c + [eos]
        ids, labels = p + c, [-100] * len(p) + c
        if len(ids) > max_length:
            counts["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
        n_labels = sum(1 for t in labels if t != -100)
        if n_labels == 0:
            counts["dropped"] += 1
            continue
        features.append({"input_ids": ids, "labels": labels})
        counts["kept"] += 1
        counts["tokens"] += len(ids)
        counts["label_tokens"] += n_labels
    return features, counts


def describe_counts(counts: dict, max_length: int) -> str:
    return (f"{counts['kept']} of {counts['examples']} examples kept ({counts['tokens']} tokens, "
            f"{counts['label_tokens']} answer tokens); {counts['truncated']} truncated to max_length={max_length}; "
            f"{counts['dropped']} dropped (no answer token left)")


class Collator:
    """Right-pads a batch: input_ids with the pad token, labels with -100, attention_mask 0 on padding."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, length), -100, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
