"""Evaluation tasks: their items (prompt, reference, few-shot exemplars), stop strings and per-rank metrics.

Task kinds, decided by the data:
    gsm8k       rows with an ``answer`` ending ``#### N`` (``gsm8k``, ``arithmetic``, question/answer JSONL):
                greedy generation with lm-eval's gsm8k prompt, stops and both answer filters
                (``extract.py``); primary metric ``exact_match_strict`` (lm-eval's ``strict-match``; the
                ``flexible-extract`` value is reported beside it). n-shot exemplars come from the train split.
    choice      JSONL rows with ``choices`` and ``label`` (and ``prompt``/``question``/``query``):
                log-likelihood of each " choice"; primary ``acc``, with lm-eval's length-normalised ``acc_norm``.
    completion  prompt/completion rows: greedy generation stopped at a blank line, exact match after
                stripping whitespace; primary ``exact_match``.
Every kind also reports the teacher-forced loss, perplexity and token accuracy of the reference answer.
"""
import json
import math
import os
import random

from ..data import load_examples, read_jsonl
from ..errors import UserError
from .extract import FEWSHOT_DELIMITER, GSM8K_STOP, gsm8k_scores, truncate_at_stop

PRIMARY = {"gsm8k": "exact_match_strict", "choice": "acc", "completion": "exact_match"}
# per-rank metrics where higher is better, so an area under the rank curve ranks methods (loss and ppl are not)
ACCURACY_METRICS = {"gsm8k": ("exact_match_strict", "exact_match_flexible", "token_acc"),
                    "choice": ("acc", "acc_norm", "token_acc"), "completion": ("exact_match", "token_acc")}
GENERATED_METRICS = ("exact_match_strict", "exact_match_flexible", "exact_match")  # need generation: not score_only


def load_task(task: str, limit: int | None, shots: int, fewshot_data: str | None, fewshot_seed: int,
              data_options: dict | None = None) -> dict:
    """The evaluation items of ``task``: kind, and per item the prompt (with exemplars) and reference.

    ``data_options`` (a run's data keys: data_config, data_format, data_columns, data_split, eval_split) say how
    ``task`` is read: items from ``eval_split`` (default "test"), exemplars from ``data_split`` ("train"); chat
    rows are evaluated on their last assistant turn.

    Raises:
        UserError: unknown task, unreadable data, or shots without a train split to draw from.
    """
    opts = data_options or {}
    read = {k: opts[k] for k in ("data_config", "data_format", "data_columns") if k in opts} | {"turns": "last"}
    path = os.path.expanduser(task)
    if os.path.isfile(path) and _is_choice_file(path):
        rows = [row for _, row in read_jsonl(path, limit)]
        items = [_choice_item(row, f"{path}:{i + 1}") for i, row in enumerate(rows)]
        kind = "choice"
    else:
        examples = load_examples(task, split=opts.get("eval_split", "test"), limit=limit, **read)
        kind = "gsm8k" if all("answer" in e for e in examples) else "completion"
        items = [{"prompt": e["prompt"], "target": e["completion"], "answer": e.get("answer")} for e in examples]
    if shots:
        _add_fewshot(items, kind, task, shots, fewshot_data, fewshot_seed, opts.get("data_split", "train"),
                     read if fewshot_data is None else {})
    return {"kind": kind, "items": items}


def _is_choice_file(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False  # data.read_jsonl reports it with file:line
                return isinstance(row, dict) and "choices" in row and "label" in row
    return False


def _choice_item(row: dict, where: str) -> dict:
    prompt = next((row[k] for k in ("prompt", "question", "query", "context") if k in row), None)
    choices, label = row.get("choices"), row.get("label")
    if not isinstance(prompt, str):
        raise UserError(f"{where}: a multiple-choice row needs a text 'prompt' (or 'question'/'query'/'context')")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise UserError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(f"{where}: 'label' must be the index of the right choice, 0..{len(choices) - 1}")
    return {"prompt": prompt, "choices": choices, "label": label, "target": " " + choices[label]}


def _add_fewshot(items, kind, task, shots, fewshot_data, seed, split="train", read=None) -> None:
    """Prefix each prompt with ``shots`` train exemplars, as lm-eval: "Q A" joined by blank lines.

    Exemplars are drawn per item, in item order, from one ``random.Random(seed)`` (lm-eval's default
    sampler with ``fewshot_random_seed=1234``).
    """
    source = fewshot_data
    if source is None:
        if os.path.isfile(os.path.expanduser(task)):
            raise UserError(f"--shots {shots} needs exemplars: give --fewshot_data TRAIN.jsonl for the task file "
                            f"{task}")
        source = task
    if kind == "choice":
        path = os.path.expanduser(source)
        pool = [_choice_item(row, f"{path}:{n}") for n, row in read_jsonl(path)]
        pool = [{"prompt": p["prompt"], "target": p["target"]} for p in pool]
    else:
        pool = [{"prompt": e["prompt"], "target": e["completion"]}
                for e in load_examples(source, split=split if fewshot_data is None else "train", **(read or {}))]
    if len(pool) < shots:
        raise UserError(f"--shots {shots} is more than the {len(pool)} exemplars in {source}")
    rng = random.Random(seed)
    for item in items:
        shots_text = "".join(e["prompt"] + e["target"] + FEWSHOT_DELIMITER for e in rng.sample(pool, shots))
        item["prompt"] = shots_text + item["prompt"]


def stop_strings(kind: str, tokenizer, extra=()) -> list[str]:
    """gsm8k: the task's ``until`` (which has no "\\n\\n"); others: lm-eval's default, the few-shot delimiter.
    Then ``extra`` and the EOS text."""
    stop = list(GSM8K_STOP) if kind == "gsm8k" else [FEWSHOT_DELIMITER]
    stop += [s for s in extra if s not in stop]
    if tokenizer.eos_token and tokenizer.eos_token not in stop:
        stop.append(tokenizer.eos_token)  # lm-eval's handle_stop_sequences
    return stop


def rank_metrics(kind: str, items, completions, scores) -> tuple[dict, list[dict]]:
    """(metrics, per-item samples) of one rank from its completions and teacher-forced scores; ``completions``
    None (score only): the teacher-forced metrics alone."""
    n = len(items)
    metrics, samples, gold = {}, [], scores
    if kind == "choice":
        correct = correct_norm = 0
        for item, per_choice in zip(items, scores):
            lls = [s[0] for s in per_choice]
            pred = max(range(len(lls)), key=lambda i: lls[i])
            pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(item["choices"][i]))  # lm-eval: chars
            correct += pred == item["label"]
            correct_norm += pred_norm == item["label"]
            samples.append({"pred": pred, "pred_norm": pred_norm, "label": item["label"], "loglikelihoods": lls})
        metrics.update(acc=correct / n, acc_norm=correct_norm / n)
        gold = [per_choice[item["label"]] for item, per_choice in zip(items, scores)]
    elif completions is not None:
        hits = {"exact_match_strict": 0, "exact_match_flexible": 0} if kind == "gsm8k" else {"exact_match": 0}
        for item, text in zip(items, completions):
            sample = {"completion": text}
            if kind == "gsm8k":
                s = gsm8k_scores(text, item["answer"])
                hits["exact_match_strict"] += s["strict_match"]
                hits["exact_match_flexible"] += s["flexible_match"]
                sample.update(strict=s["strict"], flexible=s["flexible"])
            else:
                ok = text.strip() == truncate_at_stop(item["target"], [FEWSHOT_DELIMITER]).strip()
                hits["exact_match"] += ok
                sample["match"] = ok
            samples.append(sample)
        metrics.update({k: v / n for k, v in hits.items()})
    logp = sum(s[0] for s in gold)
    tokens = sum(s[1] for s in gold)
    metrics["loss"] = -logp / tokens
    metrics["ppl"] = math.exp(min(metrics["loss"], 700.0))
    metrics["token_acc"] = sum(s[2] for s in gold) / tokens
    return metrics, samples
