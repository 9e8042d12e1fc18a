"""`matryoshka-lora eval RUN_DIR`: evaluate a run at every rank and at rank 0 (the base model, adapter off).

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
``lm-eval:<task>`` hands the model at each rank to lm-evaluation-harness instead (``lmeval.py``).

Outputs (``--output_dir``, default ``RUN_DIR/eval``): ``eval.json``, ``eval.md`` (the paper's Table 1
layout plus one row per rank), ``rank_curve.png``, and ``ranks/rank-K.json`` per finished rank
(``ranks/pretrained.json`` for rank 0) with every completion. A rerun skips each rank whose file was
written with the same settings hash (data, shots, limit, generation and model settings, adapter weights),
so an interrupted evaluation resumes; batch size and stacking are left out of the hash because they do
not change the results (see ``generate.py``). A rank's ``seconds`` is the wall time of the pass that
computed it divided by the ranks in that pass (a stacked pass is shared).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import time

from .errors import ArgumentParser, UserError
from .extract import FEWSHOT_DELIMITER, GSM8K_STOP, exact_match, gsm8k_scores, truncate_at_stop
from .files import write_json, write_text
from .generate import PRETRAINED, generate_at_ranks, rank_passes, score_at_ranks
from .ranks import aurac, log_aurac

FORMAT_VERSION = 1
PRIMARY = {"gsm8k": "exact_match_strict", "choice": "acc", "completion": "exact_match"}
# per-rank metrics where higher is better, so an area under the rank curve ranks methods (loss and ppl are not)
ACCURACY_METRICS = {"gsm8k": ("exact_match_strict", "exact_match_flexible", "token_acc"),
                    "choice": ("acc", "acc_norm", "token_acc"), "completion": ("exact_match", "token_acc")}
GENERATED_METRICS = ("exact_match_strict", "exact_match_flexible", "exact_match")  # need generation: not score_only
DEFAULTS = dict(batch_size=8, max_new_tokens=256, fewshot_seed=1234, dtype="float32",
                attn_implementation="eager")


# ----------------------------------------------------------------------------- the task


def load_task(task: str, limit: int | None, shots: int, fewshot_data: str | None, fewshot_seed: int) -> dict:
    """The evaluation items of ``task``: kind, and per item the prompt (with exemplars) and reference.

    Raises:
        UserError: unknown task, unreadable data, or shots without a train split to draw from.
    """
    from . import data

    path = os.path.expanduser(task)
    if os.path.isfile(path) and _is_choice_file(path):
        rows = [row for _, row in data.read_jsonl(path, limit)]
        items = [_choice_item(row, f"{path}:{i + 1}") for i, row in enumerate(rows)]
        kind = "choice"
    else:
        examples = data.load_examples(task, split="test", limit=limit)
        kind = "gsm8k" if all("answer" in e for e in examples) else "completion"
        items = [{"prompt": e["prompt"], "target": e["completion"], "answer": e.get("answer")} for e in examples]
    if shots:
        _add_fewshot(items, kind, task, shots, fewshot_data, fewshot_seed)
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


def _add_fewshot(items, kind, task, shots, fewshot_data, seed) -> None:
    """Prefix each prompt with ``shots`` train exemplars, as lm-eval: "Q A" joined by blank lines.

    Exemplars are drawn per item, in item order, from one ``random.Random(seed)`` (lm-eval's default
    sampler with ``fewshot_random_seed=1234``).
    """
    from . import data

    source = fewshot_data
    if source is None:
        if os.path.isfile(os.path.expanduser(task)):
            raise UserError(f"--shots {shots} needs exemplars: give --fewshot_data TRAIN.jsonl for the task file "
                            f"{task}")
        source = task
    if kind == "choice":
        path = os.path.expanduser(source)
        pool = [_choice_item(row, f"{path}:{n}") for n, row in data.read_jsonl(path)]
        pool = [{"prompt": p["prompt"], "target": p["target"]} for p in pool]
    else:
        pool = [{"prompt": e["prompt"], "target": e["completion"]}
                for e in data.load_examples(source, split="train")]
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


# ----------------------------------------------------------------------------- metrics of one rank


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


def run_group(model, tokenizer, task: dict, group: list[int], opts: dict) -> dict[int, dict]:
    """Evaluate the ranks of one pass (several when stacked): {rank: record}."""
    kind, items = task["kind"], task["items"]
    common = dict(batch_size=opts["batch_size"], stacked=True, max_length=opts.get("max_length"),
                  progress=opts.get("progress", True))
    start = time.perf_counter()
    score_only = opts.get("score_only", False)
    completions = dict.fromkeys(group)  # None: choice tasks and score_only generate nothing
    if kind != "choice" and not score_only:
        completions = generate_at_ranks(model, tokenizer, [it["prompt"] for it in items], group,
                                        max_new_tokens=opts["max_new_tokens"], stop=opts["stop"], **common)
    if kind == "choice":
        pairs = [(it["prompt"], " " + c) for it in items for c in it["choices"]]
    else:
        pairs = [(it["prompt"], it["target"]) for it in items]
    flat = score_at_ranks(model, tokenizer, pairs, group, **common)
    seconds = (time.perf_counter() - start) / len(group)  # a stacked pass is shared by its ranks
    records = {}
    for k in group:
        scores = flat[k]
        if kind == "choice":
            it = iter(scores)
            scores = [[next(it) for _ in item["choices"]] for item in items]
        metrics, samples = rank_metrics(kind, items, completions[k], scores)
        primary = "token_acc" if score_only and kind != "choice" else PRIMARY[kind]
        records[k] = {"rank": k, "value": metrics[primary], "metric": primary, "n": len(items),
                      "seconds": round(seconds, 3), "metrics": metrics, "samples": samples}
    return records


# ----------------------------------------------------------------------------- resumable per rank


def rank_file(output_dir: str, k: int) -> str:
    return os.path.join(output_dir, "ranks", "pretrained.json" if k == PRETRAINED else f"rank-{k}.json")


def load_done(output_dir: str, k: int, settings_hash: str) -> dict | None:
    """The stored record of rank k, if it was computed with these settings."""
    try:
        with open(rank_file(output_dir, k)) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("settings_hash") == settings_hash else None


def default_eval_dir(run_dir: str, inference: str | None = None, score_only: bool = False) -> str:
    """RUN_DIR/eval, or eval-<rule> / eval-score / eval-<rule>-score: a reading under another rule, or one
    without generation, never overwrites the run's own evaluation."""
    return os.path.join(run_dir, "-".join(["eval"] + ([inference] if inference else []) +
                                          (["score"] if score_only else [])))


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def settings_hash(settings: dict, items: list[dict], with_adapter: bool) -> str:
    """What a stored rank result depends on: settings, every prompt and reference, and the adapter weights."""
    keys = dict(settings)
    if not with_adapter:  # the base model's score is the same whatever the adapter and its inference rule
        keys.pop("adapter_sha256", None)
        keys.pop("inference", None)
    payload = json.dumps({"settings": keys, "items": items}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the run


def check_run(run_dir: str, ranks) -> tuple[object, list[int]]:
    """(MatryoshkaConfig, ranks) after checking the run's files, before anything is loaded or written.

    Raises:
        UserError / AdapterFileError: missing folder or files, a truncated adapter, or ranks outside 1..R.
    """
    from .adapter_io import read_weights
    from .config import MatryoshkaConfig
    from .models import read_train_config

    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir!r} not found")
    read_train_config(run_dir)
    try:
        config = MatryoshkaConfig.load(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    read_weights(run_dir)  # a missing or truncated adapter_model.safetensors fails here, naming the file
    ranks = sorted(set(config.train_ranks if ranks is None else ranks))
    bad = [k for k in ranks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.rank]
    if bad or not ranks:
        raise UserError(f"--ranks {bad or ranks} outside 1..{config.rank} (the run's maximum rank {config.rank})")
    return config, ranks


def load_model(run_dir: str, dtype: str, device, attn_implementation: str | None):
    """The run's model and tokenizer (``models.load_run``), on ``device``, with the chosen attention kernel."""
    from .models import load_run

    model, tokenizer, train_config = load_run(run_dir, dtype=dtype, device=device)
    if attn_implementation:
        base = model.get_base_model()
        try:
            base.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError) as e:
            raise UserError(f"--attn_implementation {attn_implementation!r} is not available: "
                            f"{str(e).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer, train_config


@contextlib.contextmanager
def read_as_rule(model, config):
    """Evaluate ``model`` under ``config``'s inference rule, then give it back its own config."""
    from .model import matryoshka_state

    state = matryoshka_state(model)
    own, state.config = state.config, config
    try:
        yield model
    finally:
        state.config = own


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_run(run_dir: str, task: str | None = None, ranks=None, shots: int | None = None, limit: int | None = None,
                 batch_size: int = 8, max_new_tokens: int = 256, output_dir: str | None = None,
                 stacked: bool = True, dtype: str = "float32", device: str | None = None,
                 attn_implementation: str | None = "eager", fewshot_data: str | None = None,
                 fewshot_seed: int = 1234, include_path: str | None = None, metric: str | None = None,
                 stop=(), progress: bool = True, model_and_tokenizer=None, inference: str | None = None,
                 score_only: bool = False) -> dict:
    """Evaluate a run at rank 0 (the base model) and every requested rank; write eval.json, eval.md, the plot.

    Args:
        run_dir: a folder written by ``matryoshka-lora train``.
        task: "gsm8k", "arithmetic", a JSONL file or folder, or "lm-eval:<task>" (default: the run's data).
        ranks: ranks to evaluate (default: the run's train ranks).
        shots: few-shot exemplars per prompt (from the train split, or ``fewshot_data``); None: 0, or the
            lm-eval task's own default.
        limit: evaluate the first ``limit`` test examples.
        batch_size: prompts per batch (a stacked batch holds ``batch_size × len(ranks)`` rows).
        max_new_tokens: generation budget.
        output_dir: where results go (default ``RUN_DIR/eval``).
        stacked: all ranks in one pass with per-example ranks (False: one rank after another).
        dtype, device: how the model is loaded (device default: cuda if available).
        attn_implementation: attention kernel; "eager" keeps stacked results bitwise equal to sequential
            ones on CPU; None keeps the model's.
        fewshot_data: where exemplars come from (default: the task's train split).
        fewshot_seed: seed of the exemplar draw.
        include_path: folder of custom lm-eval task YAMLs (``lm-eval:`` tasks only).
        metric: the primary metric of an ``lm-eval:`` task, e.g. "acc_norm,none" (default: see lmeval.py).
        stop: stop strings added to the task's (e.g. "\\n\\n" to end zero-shot gsm8k answers at a blank line).
        progress: show progress bars.
        model_and_tokenizer: an already loaded (model, tokenizer) of this run, to skip loading.
        inference: "paper" or "prefix" to read the trained weights under that rule instead of the run's own
            (results then go to ``RUN_DIR/eval-<inference>`` by default).
        score_only: teacher-forced metrics alone (token_acc, loss, ppl; acc and acc_norm of choice tasks): no
            generation, hence no exact match, and token_acc becomes the primary metric of generation tasks.
            Generation is most of an evaluation's time, so this suits sweeps. Results go to
            ``RUN_DIR/eval-score`` (``eval-<inference>-score``) by default.

    Returns:
        The eval.json dict.

    Raises:
        UserError / AdapterFileError: bad run folder, adapter file, task, or options.
    """
    _check_options(shots, limit, batch_size, max_new_tokens)
    config, ranks = check_run(run_dir, ranks)
    trained_as = config.inference
    try:
        config = config.read_as(inference)
    except ValueError as e:
        raise UserError(f"--inference {inference!r}: {e}") from None
    from .models import read_train_config

    train_config = read_train_config(run_dir)
    task = task or train_config.get("data")
    if not task:
        raise UserError(f"--task not given and {run_dir}/train_config.yaml names no data; "
                        "give --task gsm8k, arithmetic, a JSONL file or lm-eval:<task>")
    read_as = config.inference if config.inference != trained_as else None
    output_dir = output_dir or default_eval_dir(run_dir, read_as, score_only)
    settings = {
        "format": FORMAT_VERSION, "task": task, "shots": shots, "limit": limit, "max_new_tokens": max_new_tokens,
        "fewshot_seed": fewshot_seed, "stop": list(stop), "dtype": dtype, "attn_implementation": attn_implementation,
        "base_model": train_config.get("model_path") or train_config.get("model"),
        "adapter_sha256": file_digest(os.path.join(run_dir, "adapter_model.safetensors")),
    }
    if read_as:  # only then, so results stored before this option existed still match
        settings["inference"] = read_as
    if score_only:  # likewise
        settings["score_only"] = True
    lm_eval_task = task[len("lm-eval:"):] if task.startswith("lm-eval:") else None
    if lm_eval_task is not None and score_only:
        raise UserError(f"--score_only does not apply to {task!r}: lm-eval runs its own task (its metrics are the "
                        "task's); use a built-in task (gsm8k, arithmetic, a JSONL file) or leave --score_only out")
    if lm_eval_task is not None:
        from . import lmeval

        settings.update(metric=metric, include_path=include_path and os.path.abspath(include_path),
                        batch_size=batch_size)  # lm-eval's own batching is part of its setup
        items, kind = [], "lm-eval"
        manager = lmeval.task_manager(lm_eval_task, include_path)  # an unknown task fails before loading
    else:
        shots = shots or 0
        settings["shots"] = shots
        loaded = load_task(task, limit, shots, fewshot_data, fewshot_seed)
        kind, items = loaded["kind"], loaded["items"]
    hashes = {k: settings_hash(settings, items, with_adapter=k != PRETRAINED) for k in [PRETRAINED] + ranks}
    records = {k: r for k in hashes if (r := load_done(output_dir, k, hashes[k])) is not None}
    pending = [k for k in [PRETRAINED] + ranks if k not in records]
    if records:
        done = ", ".join("pretrained" if k == PRETRAINED else str(k) for k in sorted(records))
        print(f"matryoshka-lora eval: reusing finished ranks {done} from {output_dir}/ranks", flush=True)
    started = time.perf_counter()
    if pending:
        model, tokenizer = model_and_tokenizer or load_model(run_dir, dtype, device or default_device(),
                                                             attn_implementation)[:2]
        max_length = getattr(model.config, "max_position_embeddings", None)
        groups = [[k] for k in pending] if lm_eval_task is not None else rank_passes(pending, stacked)
        with read_as_rule(model, config):
            for group in groups:
                if lm_eval_task is not None:
                    new = {group[0]: lmeval.evaluate_rank(model, tokenizer, lm_eval_task, group[0], shots=shots,
                                                          limit=limit, batch_size=batch_size,
                                                          include_path=include_path, metric=metric,
                                                          max_new_tokens=max_new_tokens, manager=manager)}
                else:
                    opts = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
                                stop=stop_strings(kind, tokenizer, stop), progress=progress, score_only=score_only)
                    new = run_group(model, tokenizer, {"kind": kind, "items": items}, group, opts)
                for k, record in new.items():
                    record["settings_hash"] = hashes[k]
                    write_json(rank_file(output_dir, k), record, indent=1)
                    records[k] = record
    result = summarize(task, kind, ranks, records, settings, config, run_dir, stacked)
    result.update(inference=config.inference, output_dir=os.path.abspath(output_dir))
    result["seconds_total"] = round(time.perf_counter() - started, 3)
    write_outputs(result, output_dir)
    return result


def _check_options(shots, limit, batch_size, max_new_tokens) -> None:
    checks = (("shots", 0 if shots is None else shots, 0), ("batch_size", batch_size, 1),
              ("max_new_tokens", max_new_tokens, 1))
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"--{name} {value!r} is not valid; give an integer >= {low}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"--limit {limit!r} is not valid; give a positive integer (or leave it out for all)")


def log_aurac_allowed(ranks) -> bool:
    """The paper defines log-AURAC for rank sets of powers of two (equally spaced on log2); we also need two."""
    return len(ranks) >= 2 and all(k & (k - 1) == 0 for k in ranks)


def summarize(task, kind, ranks, records, settings, config, run_dir, stacked) -> dict:
    metric = records[ranks[0]].get("metric") or PRIMARY.get(kind)
    per_rank = [{key: records[k][key] for key in ("rank", "value", "n", "seconds")} | {"metrics": records[k]["metrics"]}
                for k in ranks]
    values = [r["value"] for r in per_rank]
    result = {
        "task": task, "kind": kind, "metric": metric, "run_dir": os.path.abspath(run_dir), "method": config.method,
        "max_rank": config.rank, "ranks": ranks, "pretrained": records[PRETRAINED]["value"],
        "pretrained_metrics": records[PRETRAINED]["metrics"],
        "pretrained_seconds": records[PRETRAINED]["seconds"], "per_rank": per_rank, "aurac": aurac(ranks, values),
    }
    if log_aurac_allowed(ranks):
        result["log_aurac"] = log_aurac(ranks, values)
    result.update(shots=settings["shots"], limit=settings["limit"], stacked=stacked, settings=settings)
    return result


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def markdown_table(result: dict) -> str:
    """The paper's Table 1/2 layout (PT, one column per rank, AURAC) and a per-rank detail table."""
    ranks = result["ranks"]
    head = ["Adapter", "PT"] + [str(k) for k in ranks] + ["AURAC", "log-AURAC"]
    row = [f"{result['method']} (R={result['max_rank']})", _pct(result["pretrained"])]
    row += [_pct(r["value"]) for r in result["per_rank"]] + [_pct(result["aurac"]), _pct(result.get("log_aurac"))]
    shots = "task-default" if result["shots"] is None else result["shots"]
    lines = [f"# {result['task']}: {result['metric']} (%) per rank", "",
             f"{shots}-shot, {result['per_rank'][0]['n']} examples; PT = the base model without adapter.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
    names = sorted(result["pretrained_metrics"])
    lines += ["| rank | " + " | ".join(names) + " | n | seconds |", "|" + "---|" * (len(names) + 3)]
    entries = [("PT", result["pretrained_metrics"], result["per_rank"][0]["n"], result["pretrained_seconds"])]
    entries += [(str(r["rank"]), r["metrics"], r["n"], r["seconds"]) for r in result["per_rank"]]
    for name, metrics, n, seconds in entries:
        cells = [f"{metrics[m]:.4g}" if isinstance(metrics.get(m), (int, float)) else "" for m in names]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {n} | {seconds} |")
    return "\n".join(lines) + "\n"


def plot_rank_curves(curves: dict, ranks, pretrained: float, metric: str, title: str, path: str) -> None:
    """One line per label in ``curves`` ({label: values per rank}) on a log2 rank axis, the base model as a
    dashed line; written atomically to ``path``. Labels "METHOD (variant)" share METHOD's colour and differ in
    line style, so a plot of many runs stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 6
    fig, ax = plt.subplots(figsize=(8.5 if many else 6, 4), dpi=120)
    colours, styles = plt.get_cmap("tab10").colors, ["o-", "s--", "^:", "d-."]
    methods, variants = list(dict.fromkeys(label.split(" (")[0] for label in curves)), {}
    for label, values in curves.items():
        m = label.split(" (")[0]
        variants[m] = variants.get(m, -1) + 1
        ax.plot(ranks, values, styles[variants[m] % len(styles)], color=colours[methods.index(m) % len(colours)],
                label=label)
    ax.axhline(pretrained, color="gray", linestyle="--", label="pretrained")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    if many:  # beside the axes, where it hides no curve
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curve(result: dict, path: str) -> None:
    """The run's value vs rank."""
    label = f"{result['method']} (R={result['max_rank']})"
    plot_rank_curves({label: [r["value"] for r in result["per_rank"]]}, result["ranks"], result["pretrained"],
                     result["metric"], f"{result['task']}  AURAC {result['aurac']:.3f}", path)


def write_outputs(result: dict, output_dir: str) -> None:
    write_json(os.path.join(output_dir, "eval.json"), result, indent=1)
    write_text(os.path.join(output_dir, "eval.md"), markdown_table(result))
    plot_curve(result, os.path.join(output_dir, "rank_curve.png"))


# ----------------------------------------------------------------------------- command line


def parse_ranks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ranks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--ranks {text!r} is not valid; give comma-separated integers such as 1,2,4,8") from None
    if not ranks:
        raise UserError(f"--ranks {text!r} is empty; give comma-separated integers such as 1,2,4,8")
    return ranks


def _unescape(text: str) -> str:
    """'\\n\\n' typed on a command line -> two newlines."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a trained run at every rank and at rank 0 (the base model, adapter off): "
                    "accuracy per rank, AURAC and log-AURAC, teacher-forced loss/perplexity, a Markdown table "
                    "in the paper's layout and a rank curve. All ranks run in one stacked pass by default.",
        epilog="tasks:\n"
               "  gsm8k, arithmetic      generation with lm-eval's gsm8k prompt; exact match strict (primary)\n"
               "                         and flexible, as lm-eval's two filters\n"
               "  FILE.jsonl / FOLDER    question/answer rows (as gsm8k), prompt/completion rows (exact match),\n"
               "                         or choices+label rows (multiple choice: acc, acc_norm)\n"
               "  lm-eval:TASK           lm-evaluation-harness on the model at each rank (arc_challenge,\n"
               "                         hellaswag, gsm8k, ... or your YAML via --include_path)\n\n"
               "outputs in --output_dir: eval.json, eval.md, rank_curve.png, ranks/rank-K.json (finished ranks\n"
               "are reused when rerun with the same settings, so an interrupted run resumes)\n\n"
               "example:\n  matryoshka-lora eval runs/gsm8k --task /data/gsm8k --shots 8 --limit 200 --ranks 1,2,4,8")
    p.add_argument("run_dir", help="a folder written by `matryoshka-lora train`")
    p.add_argument("--task", default=None, help="gsm8k, arithmetic, a JSONL file or folder, or lm-eval:TASK "
                                                "(default: the run's training data, test split)")
    p.add_argument("--ranks", default=None,
                   help="comma-separated ranks, e.g. 1,2,4,8 (default: the run's train ranks)")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot exemplars from the train split (default: 0; for lm-eval:TASK the task's own)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test examples")
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"],
                   help="prompts per batch; a stacked batch runs this many prompts at every rank "
                        "(default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULTS["max_new_tokens"],
                   help="generation budget per prompt (default: %(default)s, lm-eval's)")
    p.add_argument("--output_dir", default=None, help="where results go (default: RUN_DIR/eval)")
    p.add_argument("--sequential", action="store_true",
                   help="evaluate one rank after another instead of stacking all ranks in one pass (same results)")
    p.add_argument("--fewshot_data", default=None, help="file or folder of exemplars (default: the task's train split)")
    p.add_argument("--fewshot_seed", type=int, default=DEFAULTS["fewshot_seed"],
                   help="seed of the exemplar draw (default: %(default)s, lm-eval's)")
    p.add_argument("--dtype", default=DEFAULTS["dtype"], choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--attn_implementation", default=DEFAULTS["attn_implementation"],
                   help="attention kernel: eager (default; stacked results are bitwise those of --sequential on "
                        "CPU), sdpa, or model for the model's own")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="an extra stop string (repeatable; \\n and \\t are read as escapes, e.g. --stop '\\n\\n'); gsm8k "
                        "stops at lm-eval's Question:, </s>, <|im_end|> and EOS")
    p.add_argument("--include_path", default=None, help="folder of custom lm-eval task YAMLs (lm-eval:TASK only)")
    p.add_argument("--metric", default=None,
                   help="primary metric of an lm-eval task, e.g. acc,none (default: the first present of "
                        "exact_match,strict-match, acc_norm,none, acc,none, exact_match,none)")
    p.add_argument("--inference", default=None, choices=("paper", "prefix"),
                   help="read the weights as rank k = s_k·A_k B_k (paper) or as the truncation of the trained "
                        "function (prefix; matryoshka and lora runs) instead of the run's own rule; results go to "
                        "RUN_DIR/eval-<rule>")
    p.add_argument("--score_only", action="store_true",
                   help="teacher-forced metrics alone (token_acc, loss, ppl; acc/acc_norm of choice tasks), no "
                        "generation and so no exact match: several times faster, for sweeps; results go to "
                        "RUN_DIR/eval-score (not lm-eval:TASK)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    result = evaluate_run(
        args.run_dir, task=args.task, ranks=parse_ranks(args.ranks), shots=args.shots, limit=args.limit,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, output_dir=args.output_dir,
        stacked=not args.sequential, dtype=args.dtype, device=args.device,
        attn_implementation=None if args.attn_implementation == "model" else args.attn_implementation,
        fewshot_data=args.fewshot_data, fewshot_seed=args.fewshot_seed, include_path=args.include_path,
        metric=args.metric, stop=[_unescape(t) for t in args.stop], progress=not args.no_progress,
        inference=args.inference, score_only=args.score_only)
    out = args.output_dir or os.path.relpath(result["output_dir"])
    print(markdown_table(result).split("\n\n")[2])
    print(f"wrote {out}/eval.json, eval.md, rank_curve.png")
    return 0
