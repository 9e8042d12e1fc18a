"""Training data: named tasks, local files or hub datasets as examples, tokenized with the loss on what is learnt.

Sources (``data``):
    "arithmetic"            the built-in seeded generator (offline)
    "gsm8k"                 hub ``openai/gsm8k`` (config ``main``); prompt ``Question: {q}\\nAnswer:`` as lm-eval
    "platypus"              hub ``garage-bAInd/Open-Platypus``
    a file                  .jsonl, .json, .csv or .parquet, read by ``datasets.load_dataset``
    a folder                ``{split}.jsonl`` (or .json/.csv/.parquet) inside it, else the folder as
                            ``load_dataset(folder, split=split)`` lays it out
    a hub id                ``owner/name`` (``tatsu-lab/alpaca``): ``load_dataset(id, data_config, split=split)``

Formats (``data_format``; ``auto`` detects them per row from the columns, ``data_columns`` renames columns first):
    question_answer     question/answer (GSM8K): prompt ``Question: {q}\\nAnswer:``, completion `` {answer}``
    alpaca              instruction/input/output (Alpaca, Platypus): the Alpaca template
    prompt_completion   prompt/completion, as they are
    messages            OpenAI ``messages`` [{role, content}]: the tokenizer's chat template, loss on every
                        assistant turn (auto-detected ``messages`` keep 0.1's rule: the last assistant turn)
    sharegpt            ``conversations`` [{from, value}] (human/gpt/system): as ``messages``
    text                plain language modelling, loss on every token (never auto-detected: give it by name)

An example is {"prompt", "completion"} (the loss on the completion), or {"segments": [(text, trained), ...]} for
multi-turn chat and text rows.
"""
import contextlib
import difflib
import json
import os
import re
import tempfile

from .arithmetic import make_split
from .errors import UserError

TASKS = ("arithmetic", "gsm8k", "platypus")
GSM8K_HUB = ("openai/gsm8k", "main")
PLATYPUS_HUB = "garage-bAInd/Open-Platypus"
ARITHMETIC_SIZES = {"train": 2000, "test": 200}  # when no limit is given
FORMATS = "question/answer, instruction/input/output, prompt/completion or messages"
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "question_answer", "text")
FORMAT_COLUMNS = {"question_answer": ("question", "answer"), "alpaca": ("instruction", "output"),
                  "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
                  "sharegpt": ("conversations",), "text": ("text",)}
COLUMNS = ("question", "answer", "instruction", "input", "output", "prompt", "completion", "messages",
           "conversations", "text")  # the names --data_columns maps to
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
                  seed: int = 0, data_format: str = "auto", data_columns: dict | None = None,
                  data_config: str | None = None, turns: str = "all") -> list[dict]:
    """Examples from a task name, a local file or folder, or a hub dataset.

    Args:
        data: "arithmetic", "gsm8k", "platypus", a .jsonl/.json/.csv/.parquet file, a folder, or a hub id.
        split: "train" or "test", or any split name of the folder or hub dataset (``train[:90%]`` slices).
        limit: keep the first ``limit`` examples (arithmetic: generate that many).
        tokenizer: used for its chat template on chat rows.
        seed: the arithmetic generator's seed.
        data_format: one of ``DATA_FORMATS``; "auto" detects each row's format from its columns.
        data_columns: {format column: column of the data}, e.g. {"prompt": "question", "completion": "answer"}.
        data_config: the hub dataset's config (subset) name.
        turns: "all" trains every assistant turn of chat rows given an explicit chat format (or sharegpt);
            "last" makes every chat row a prompt/completion pair ending at its last assistant turn (evaluation).

    Returns:
        A list of {"prompt", "completion"} dicts (GSM8K-style rows also keep the raw "answer", ending ``#### N``),
        or {"segments": [(text, trained), ...]} dicts (multi-turn chat, text).

    Raises:
        UserError: unknown source or format, unreadable file (``file:line``), missing columns, or no examples.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit={limit!r} is not valid; give a positive integer or nothing for all examples")
    if not isinstance(data, str) or not data:
        raise UserError(f"data={data!r} is not valid; choose {', '.join(TASKS)}, a data file, a folder or a hub id")
    if data_format not in DATA_FORMATS:
        raise UserError(f"data_format={data_format!r} is not valid; choose one of {', '.join(DATA_FORMATS)}")
    problem = columns_problem(data_columns)
    if problem:
        raise UserError(problem)
    path = os.path.expanduser(data)
    if os.path.isdir(path):
        rows, source = _folder_rows(path, data, split, limit), data
    elif os.path.isfile(path):
        rows, source = _file_rows(path, limit), path
    elif data == "arithmetic":
        try:
            problems = make_split(split, limit or ARITHMETIC_SIZES.get(split, 1000), seed)
        except ValueError as e:
            raise UserError(str(e)) from None
        rows, source = [("arithmetic", p) for p in problems], "arithmetic"
    elif data in ("gsm8k", "platypus"):
        rows, source = [(data, row) for row in _hub_rows(data, split, limit)], data
    elif os.path.splitext(path)[1].lower() in FILE_TYPES:
        raise UserError(f"data file {data} not found")
    elif HUB_ID.match(data) and not data.startswith("."):
        rows, source = _hub_dataset_rows(data, data_config, split, limit), data
    else:
        close = difflib.get_close_matches(data, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"data={data!r} is neither a task ({', '.join(TASKS)}) nor an existing file or folder, "
                        f"nor a hub dataset id (owner/name){hint}")
    examples = [to_example(_renamed(row, data_columns, where), where, tokenizer, data_format, turns)
                for where, row in rows]
    if not examples:
        raise UserError(f"data {source} ({split}) holds no examples")
    return examples[:limit] if limit else examples


def columns_problem(data_columns) -> str | None:
    """What is wrong with a ``data_columns`` mapping, or None."""
    if data_columns is None:
        return None
    if not isinstance(data_columns, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                     for k, v in data_columns.items()):
        return (f"data_columns={data_columns!r} is not valid; give format=column pairs such as "
                "prompt=question,completion=answer")
    unknown = sorted(set(data_columns) - set(COLUMNS))
    if unknown:
        return (f"data_columns: {', '.join(map(repr, unknown))} is not a format column; map one of "
                f"{', '.join(COLUMNS)} (as prompt=question)")
    return None


def _renamed(row: dict, data_columns: dict | None, where: str) -> dict:
    """The row with its null columns left out (a file's rows share one schema) and ``data_columns`` applied."""
    if data_columns:
        missing = [v for v in data_columns.values() if v not in row]
        if missing:
            raise UserError(f"{where}: --data_columns names column {missing[0]!r}, which the data lacks "
                            f"(found {sorted(row)})")
        sources = set(data_columns.values())
        row = {k: v for k, v in row.items() if k not in sources} | {k: row[v] for k, v in data_columns.items()}
    return {k: v for k, v in row.items() if v is not None}


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or log lines from ``datasets`` (errors are reported as one line by the caller)."""
    import datasets

    verbosity, bars = datasets.logging.get_verbosity(), datasets.utils.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None and "error occurred while generating" in str(e):  # datasets wraps the cause
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_local(*args, **kwargs):
    """``datasets.load_dataset`` of local data into memory, its cache in a temporary folder (a file edited in
    place is read again, and nothing is left in the user's cache)."""
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="matryoshka-data-") as cache:
        return datasets.load_dataset(*args, cache_dir=cache, keep_in_memory=True, **kwargs)


def _file_rows(path: str, limit: int | None) -> list[tuple[str, dict]]:
    """(where, row) of a .jsonl/.json/.csv/.parquet file; ``where`` is ``file:line`` for JSONL, else ``file row N``.

    A JSONL file that ``datasets`` cannot read is reported by ``read_jsonl`` (``file:line``), and read by it when it
    finds nothing wrong (rows whose ignored columns change type, which Arrow refuses), as before.
    """
    ext = os.path.splitext(path)[1].lower()
    builder = FILE_TYPES.get(ext, "json")
    jsonl = builder == "json" and ext != ".json"  # any other name is read as JSON lines, as before
    try:
        ds = _load_local(builder, data_files=path, split="train", **(_csv_as_text(path) if builder == "csv" else {}))
    except Exception as e:  # Arrow, JSON, CSV and datasets errors of many types
        if jsonl:
            return [(f"{path}:{line}", row) for line, row in read_jsonl(path, limit)]  # the line's problem, or rows
        if "corresponds to no data" in str(e):
            raise UserError(f"{path} is empty: no rows to train on") from None
        raise UserError(f"cannot read {path} as {ext.lstrip('.')}: {_first_line(e)}") from None
    if jsonl:
        lines = _nonblank_lines(path)
        if len(lines) != len(ds):  # a line that is not one object (datasets reads a JSON list as rows of 'text')
            return [(f"{path}:{line}", row) for line, row in read_jsonl(path, limit)]
    if len(ds) == 0:
        raise UserError(f"{path} is empty: no rows to train on")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    if jsonl:
        return [(f"{path}:{line}", row) for line, row in zip(lines, ds)]
    return [(f"{path} row {i}", row) for i, row in enumerate(ds, 1)]


def _csv_as_text(path: str) -> dict:
    """CSV cells read as text ("007" stays "007", an empty cell ""), not as the numbers pandas would infer."""
    import csv

    from datasets import Features, Value

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), None)
    if not header:
        return {}
    return {"features": Features({c: Value("string") for c in header}), "keep_default_na": False}


def _nonblank_lines(path: str) -> list[int]:
    """The line numbers of the non-blank lines (JSONL row i is on the i-th of them)."""
    with open(path, "rb") as f:
        return [number for number, raw in enumerate(f, 1) if raw.strip()]


def _folder_rows(path: str, data: str, split: str, limit: int | None) -> list[tuple[str, dict]]:
    """``{split}.jsonl`` (or .json/.csv/.parquet) in the folder, else the folder's ``split`` as datasets lays it out."""
    for ext in FILE_TYPES:
        file = os.path.join(path, f"{split}{ext}")
        if os.path.isfile(file):
            return _file_rows(file, limit)
    try:
        ds = _load_local(path, split=split)
    except Exception as e:
        raise UserError(f"data folder {data} has no {split}.jsonl (nor {split}.json, .csv or .parquet; "
                        f"datasets: {_first_line(e)})") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [(f"{data} ({split}) row {i}", row) for i, row in enumerate(ds, 1)]


def _hub_dataset_rows(name: str, config: str | None, split: str, limit: int | None) -> list[tuple[str, dict]]:
    """Rows of a hub dataset: ``load_dataset(name, config, split=split)``."""
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline: ConnectionError, DatasetNotFoundError, ...; a missing config or split
        config_text = f", config {config}" if config else ""
        raise UserError(f"cannot load {name} ({split}{config_text}) from the hub ({_first_line(e)}); check the id, "
                        "--data_config and --data_split, give a local .jsonl/.json/.csv/.parquet file or folder, "
                        "or connect to the hub") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [(f"{name} ({split}) row {i}", row) for i, row in enumerate(ds, 1)]


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


def to_example(row: dict, where: str, tokenizer=None, data_format: str = "auto", turns: str = "all") -> dict:
    """One row as {"prompt", "completion"} (plus "answer" for GSM8K-style rows), or {"segments"} (chat, text).

    Raises:
        UserError: the row lacks the format's columns (auto: has none of the column sets), or a value is not text.
    """
    fmt = data_format if data_format != "auto" else _detect(row, where)
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in row]
    if missing:
        raise UserError(f"{where}: missing columns for --data_format {fmt}: expected {', '.join(FORMAT_COLUMNS[fmt])}"
                        f", found {sorted(row)}")
    if fmt == "question_answer":
        q, a = _text(row, "question", where), _text(row, "answer", where)
        return {"prompt": gsm8k_prompt(q), "completion": gsm8k_completion(a), "answer": a}
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction", where), _text(row, "output", where)
        input_text = _text(row, "input", where) if row.get("input") is not None else ""
        return {"prompt": platypus_prompt(instruction, input_text), "completion": output}
    if fmt == "prompt_completion":
        return {"prompt": _text(row, "prompt", where), "completion": _text(row, "completion", where)}
    if fmt == "text":
        if turns == "last":
            raise UserError(f"{where}: text rows (plain language modelling) have no answer to evaluate; give "
                            "--task a question/answer, prompt/completion or chat file")
        return {"segments": [(_text(row, "text", where), True)], "text": True}
    messages = row["messages"] if fmt == "messages" else sharegpt_messages(row["conversations"], where)
    if data_format == "auto" and fmt == "messages" or turns == "last":
        return chat_example(messages, where, tokenizer)  # 0.1's rule: the last assistant turn
    return chat_segments(messages, where, tokenizer, fmt)


def _detect(row: dict, where: str) -> str:
    for fmt in ("question_answer", "alpaca", "prompt_completion", "messages", "sharegpt"):
        if all(c in row for c in FORMAT_COLUMNS[fmt]):
            return fmt
    hint = "; a 'text' column is plain language modelling: give --data_format text" if "text" in row else ""
    raise UserError(f"{where}: missing columns: found {sorted(row)}, expected {FORMATS}, or sharegpt conversations "
                    f"(or name the columns with --data_columns prompt=question,completion=answer){hint}")


def sharegpt_messages(conversations, where: str) -> list[dict]:
    """ShareGPT ``conversations`` [{from, value}] as OpenAI messages [{role, content}]."""
    if not isinstance(conversations, list) or not conversations:
        raise UserError(f"{where}: 'conversations' must be a non-empty list of {{\"from\", \"value\"}} objects")
    messages = []
    for turn in conversations:
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise UserError(f"{where}: 'conversations' must be a non-empty list of {{\"from\", \"value\"}} objects")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise UserError(f"{where}: conversations: unknown speaker from={turn['from']!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


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
    messages = _checked_messages(messages, where)
    history, last = messages[:-1], messages[-1]["content"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return {"prompt": prompt, "completion": full[len(prompt):], "chat": True}
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"
    return {"prompt": prompt, "completion": " " + last}


def _checked_messages(messages, where: str) -> list[dict]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # Arrow fills absent keys with null
    if messages[-1]["role"] != "assistant":
        none = "the conversation has no assistant turn; " if all(m["role"] != "assistant" for m in messages) else ""
        raise UserError(f"{where}: {none}the last message must be the assistant's (the completion to learn), "
                        f"got role {messages[-1]['role']!r}")
    return messages


def chat_segments(messages, where: str, tokenizer, fmt: str = "messages") -> dict:
    """A chat rendered by the tokenizer's chat template as segments, every assistant turn trained (as TRL's
    ``assistant_only_loss``): each assistant turn is the text that rendering it adds after the history and the
    generation prompt, the template's end-of-turn included.

    Raises:
        UserError: bad messages, no assistant turn, no chat template, or a template that does not render the
            conversation turn by turn (each prefix a prefix of the whole).
    """
    messages = _checked_messages(messages, where)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where}: {fmt} rows are chat data, rendered by the tokenizer's chat template, and this "
                        "model's tokenizer has none; train a chat/instruct model, or give the data as "
                        "prompt/completion (--data_format prompt_completion --data_columns prompt=...,completion=...)")

    def render(msgs, generation=False):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
        except Exception as e:  # jinja errors: the template refuses this conversation (roles, order)
            raise UserError(f"{where}: the chat template refuses this conversation: {_first_line(e)}") from None

    full, segments, cursor = render(messages), [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], generation=True), render(messages[:i + 1])
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= cursor):
            raise UserError(f"{where}: the chat template does not render this conversation turn by turn (message "
                            f"{i + 1} changes the text before it), so its assistant turns cannot be marked; give the "
                            "data as prompt/completion pairs")
        segments += [(full[cursor:len(before)], False), (full[len(before):len(upto)], True)]
        cursor = len(upto)
    if cursor < len(full):
        segments.append((full[cursor:], False))
    return {"segments": [(t, trained) for t, trained in segments if t], "chat": True}


def tokenize_examples(examples: list[dict], tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Token ids with labels on the completion only (prompt tokens -100), EOS appended.

    Segment examples (multi-turn chat, text) are the concatenation of their segments' tokens, labelled where the
    segment is trained; text rows start with the tokenizer's special tokens (unlabelled) and end with EOS.
    Over-long examples are cut to ``max_length`` (counted); examples left with no completion token, or
    with an empty completion, are dropped (counted).

    Returns:
        (features, counts): features are {"input_ids", "labels"} lists; counts has
        "examples", "kept", "truncated", "dropped", "tokens" (kept tokens) and "label_tokens".
    """
    eos = tokenizer.eos_token_id
    pairs = [e for e in examples if "segments" not in e]
    prompts = tokenizer([e["prompt"] for e in pairs], add_special_tokens=True)["input_ids"] if pairs else []
    if any(e.get("chat") for e in pairs):  # a chat template writes its own BOS
        bare = tokenizer([e["prompt"] for e in pairs], add_special_tokens=False)["input_ids"]
        prompts = [b if e.get("chat") else p for e, p, b in zip(pairs, prompts, bare)]
    completions = tokenizer([e["completion"] for e in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    tokenized = iter(zip(prompts, completions))
    segmented = iter(_tokenize_segments([e for e in examples if "segments" in e], tokenizer))
    features, counts = [], dict(examples=len(examples), kept=0, truncated=0, dropped=0, tokens=0, label_tokens=0)
    for e in examples:
        if "segments" in e:
            ids, labels = next(segmented)
            if not any(t.strip() for t, trained in e["segments"] if trained):
                counts["dropped"] += 1
                continue
        else:
            p, c = next(tokenized)
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


def _tokenize_segments(examples: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of segment examples: each segment tokenized on its own (chat: at the template's turn
    boundaries), labels -100 on untrained segments; EOS appended (trained) unless the last two tokens hold it."""
    if not examples:
        return []
    eos = tokenizer.eos_token_id
    texts = [t for e in examples for t, _ in e["segments"]]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    out = []
    for e in examples:
        ids, labels = [], []
        if e.get("text"):  # plain text: the tokenizer's own leading special tokens (BOS), unlabelled
            text = e["segments"][0][0]
            full, bare = tokenizer(text)["input_ids"], tokenizer(text, add_special_tokens=False)["input_ids"]
            prefix = full[:len(full) - len(bare)] if full[len(full) - len(bare):] == bare else []
            ids, labels = list(prefix), [-100] * len(prefix)
        for _, trained in e["segments"]:
            piece = next(pieces)
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        if eos is not None and e["segments"][-1][1] and eos not in ids[-2:]:
            ids, labels = ids + [eos], labels + [eos]
        out.append((ids, labels))
    return out


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
        import torch  # here, so that the config (which reads this module's formats) loads without torch

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
