"""Rows as training examples: the formats, their prompt templates, and chat conversations.

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
from .errors import UserError, first_line

FORMATS = "question/answer, instruction/input/output, prompt/completion or messages"
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "question_answer", "text")
FORMAT_COLUMNS = {"question_answer": ("question", "answer"), "alpaca": ("instruction", "output"),
                  "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
                  "sharegpt": ("conversations",), "text": ("text",)}
COLUMNS = ("question", "answer", "instruction", "input", "output", "prompt", "completion", "messages",
           "conversations", "text")  # the names --data_columns maps to
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}


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


def renamed(row: dict, data_columns: dict | None, where: str) -> dict:
    """The row with its null columns left out (a file's rows share one schema) and ``data_columns`` applied."""
    if data_columns:
        missing = [v for v in data_columns.values() if v not in row]
        if missing:
            raise UserError(f"{where}: --data_columns names column {missing[0]!r}, which the data lacks "
                            f"(found {sorted(row)})")
        sources = set(data_columns.values())
        row = {k: v for k, v in row.items() if k not in sources} | {k: row[v] for k, v in data_columns.items()}
    return {k: v for k, v in row.items() if v is not None}


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
            raise UserError(f"{where}: the chat template refuses this conversation: {first_line(e)}") from None

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
