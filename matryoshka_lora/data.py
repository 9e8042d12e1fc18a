"""Training data: named tasks, local files or hub datasets as examples, tokenized with the loss on what is learnt.

Sources (``data``):
    "arithmetic"            the built-in seeded generator (offline)
    "gsm8k"                 hub ``openai/gsm8k`` (config ``main``); prompt ``Question: {q}\\nAnswer:`` as lm-eval
    "platypus"              hub ``garage-bAInd/Open-Platypus``
    a file                  .jsonl, .json, .csv or .parquet, read by ``datasets.load_dataset``
    a folder                ``{split}.jsonl`` (or .json/.csv/.parquet) inside it, else the folder as
                            ``load_dataset(folder, split=split)`` lays it out
    a hub id                ``owner/name`` (``tatsu-lab/alpaca``): ``load_dataset(id, data_config, split=split)``

Each source gives rows; ``formats.py`` makes them examples and ``features.py`` tokenizes them.
"""
import contextlib
import csv
import difflib
import json
import os
import re
import tempfile

from .arithmetic import make_split
from .errors import UserError, first_line
from .formats import DATA_FORMATS, renamed, columns_problem, to_example

TASKS = ("arithmetic", "gsm8k", "platypus")
GSM8K_HUB = ("openai/gsm8k", "main")
PLATYPUS_HUB = "garage-bAInd/Open-Platypus"
ARITHMETIC_SIZES = {"train": 2000, "test": 200}  # when no limit is given
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    examples = [to_example(renamed(row, data_columns, where), where, tokenizer, data_format, turns)
                for where, row in rows]
    if not examples:
        raise UserError(f"data {source} ({split}) holds no examples")
    return examples[:limit] if limit else examples


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or log lines from ``datasets`` (errors are reported as one line by the caller)."""
    import datasets  # seconds to import: only on first use, not for --help or config checks

    verbosity, bars = datasets.logging.get_verbosity(), datasets.utils.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


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
        raise UserError(f"cannot read {path} as {ext.lstrip('.')}: {first_line(e)}") from None
    if jsonl:
        lines = _nonblank_lines(path)
        if len(lines) != len(ds):  # a line that is not one object (datasets reads a JSON list as rows of 'text')
            return [(f"{path}:{line}", row) for line, row in read_jsonl(path, limit)]
    if len(ds) == 0:
        raise UserError(f"{path} is empty: no rows to train on")
    ds = _head(ds, limit)
    if jsonl:
        return [(f"{path}:{line}", row) for line, row in zip(lines, ds)]
    return [(f"{path} row {i}", row) for i, row in enumerate(ds, 1)]


def _head(ds, limit: int | None):
    """The first ``limit`` rows of a ``datasets.Dataset`` (all without a limit)."""
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def _csv_as_text(path: str) -> dict:
    """CSV cells read as text ("007" stays "007", an empty cell ""), not as the numbers pandas would infer."""
    from datasets import Features, Value  # see _quiet_datasets

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
                        f"datasets: {first_line(e)})") from None
    return [(f"{data} ({split}) row {i}", row) for i, row in enumerate(_head(ds, limit), 1)]


def _hub_dataset_rows(name: str, config: str | None, split: str, limit: int | None) -> list[tuple[str, dict]]:
    """Rows of a hub dataset: ``load_dataset(name, config, split=split)``."""
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline: ConnectionError, DatasetNotFoundError, ...; a missing config or split
        config_text = f", config {config}" if config else ""
        raise UserError(f"cannot load {name} ({split}{config_text}) from the hub ({first_line(e)}); check the id, "
                        "--data_config and --data_split, give a local .jsonl/.json/.csv/.parquet file or folder, "
                        "or connect to the hub") from None
    return [(f"{name} ({split}) row {i}", row) for i, row in enumerate(_head(ds, limit), 1)]


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
        local = "a local JSONL with question/answer" if task == "gsm8k" else "a local JSONL with instruction/input/output"
        raise UserError(f"cannot load {task} ({split}) from the hub ({first_line(e)}); give --data {local} "
                        f"(e.g. path/to/{split}.jsonl), or connect to the hub") from None
    return _head(ds, limit)


