"""`matryoshka-lora compare CONFIG.yaml`: train every method with the same config and seeds, evaluate all at
the same ranks, and report one side-by-side table (per-rank values, AURAC, log-AURAC, means over seeds) and
one plot.

``lora-svd`` is a baseline the paper did not run: the trained plain-LoRA adapter truncated at rank k by the SVD
of its ΔW (the best rank-k approximation). It tells whether nested training beats post-hoc truncation.
"""
import argparse
import json
import os
import shutil
import statistics
import time

from .config import METHODS
from .errors import ArgumentParser, UserError
from .evaluate import parse_ranks
from .files import write_json, write_text
from .ranks import aurac, log_aurac

SVD = "lora-svd"
SVD_SOURCE = "svd_source.json"  # which LoRA adapter an SVD run was made from
ALL_METHODS = METHODS + (SVD,)
DEFAULT_METHODS = "dylora,matryoshka,lora,lora-svd"
DEFAULT_SEEDS = "42,666,2408"  # the paper's
EVAL_OPTIONS = ("task", "ranks", "shots", "limit", "batch_size", "max_new_tokens", "score_only")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise UserError(f"--methods {text!r}: {bad or 'none given'} not valid; choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(methods))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"--seeds {text!r} is not valid; give comma-separated integers such as 42,666,2408")
    return list(dict.fromkeys(seeds))


def train_or_reuse(file_values: dict, overrides: dict, method: str, seed: int, run_dir: str, source: str) -> str:
    """Train one (method, seed) into ``run_dir``, or reuse it when a complete run with this config is there."""
    from . import train as train_mod

    config = train_mod.build_config(file_values, {**overrides, "method": method, "seed": seed,
                                                  "output_dir": run_dir}, source=source)
    if _complete_with_same_config(run_dir, config):
        print(f"matryoshka-lora compare: reusing the finished run {run_dir}", flush=True)
        return run_dir
    config.overwrite = os.path.isdir(run_dir)
    return train_mod.train(config)


def _complete_with_same_config(run_dir: str, config) -> bool:
    from . import train as train_mod
    from .models import read_train_config

    if not os.path.isfile(os.path.join(run_dir, train_mod.COMPLETE_NAME)):
        return False
    saved = read_train_config(run_dir)
    wanted = {k: v for k, v in vars(config).items() if k not in ("overwrite", "resume")}
    # a key the saved config lacks was added by a later version: the run used what is now its default
    defaults = train_mod.TrainConfig()
    return all((saved[k] if k in saved else getattr(defaults, k)) == v for k, v in wanted.items())


def make_svd_run(lora_run: str, run_dir: str) -> str:
    """A run folder whose adapter is the SVD re-factoring of ``lora_run``'s (same tokenizer and train config).
    An existing one made from the same LoRA adapter is kept, so its evaluation is reused (the SVD may differ in
    the last bits between runs, which would change the adapter's hash)."""
    from .evaluate import file_digest
    from .svd import svd_adapter

    source = file_digest(os.path.join(lora_run, "adapter_model.safetensors"))
    record = os.path.join(run_dir, SVD_SOURCE)
    if os.path.isfile(record) and os.path.isfile(os.path.join(run_dir, "adapter_model.safetensors")):
        with open(record) as f:
            if json.load(f).get("lora_adapter_sha256") == source:
                return run_dir
    if os.path.isfile(record):
        os.remove(record)
    svd_adapter(lora_run, run_dir, keep_run_files=True)
    write_json(record, {"lora_run": os.path.abspath(lora_run), "lora_adapter_sha256": source})
    return run_dir


def share_pretrained(first_eval_dir: str, eval_dir: str) -> None:
    """The base model's score does not depend on the adapter: give later runs the first run's record
    (evaluate reuses it only when its settings hash matches)."""
    from .evaluate import PRETRAINED, rank_file

    src, dst = rank_file(first_eval_dir, PRETRAINED), rank_file(eval_dir, PRETRAINED)
    if os.path.isfile(src) and not os.path.isfile(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def check_metric(metric: str | None, lm_eval_task: bool, score_only: bool = False) -> None:
    """Fail before any training on a metric no built-in task reports (lm-eval tasks name their own), or one that
    needs the generation ``score_only`` skips."""
    from .evaluate import ACCURACY_METRICS, GENERATED_METRICS

    valid = sorted({m for names in ACCURACY_METRICS.values() for m in names})
    if score_only and metric in GENERATED_METRICS:
        raise UserError(f"--metric {metric!r} needs generation, which --score_only skips; choose token_acc (or acc, "
                        "acc_norm for multiple choice), or leave --score_only out")
    if metric is not None and not lm_eval_task and metric not in valid:
        raise UserError(f"--metric {metric!r} is not valid; choose from {', '.join(valid)} (higher is better, so "
                        "AURAC ranks methods by it)")


def _metric_value(result: dict, record: dict | None, metric: str | None) -> float:
    """The rank's (record's, or the pretrained model's when None) value of ``metric`` (None: the primary)."""
    if metric is None or metric == result["metric"]:
        return result["pretrained"] if record is None else record["value"]
    metrics = result["pretrained_metrics"] if record is None else record["metrics"]
    if metric not in metrics:
        raise UserError(f"--metric {metric!r}: the {result['kind']} task {result['task']!r} reports "
                        f"{', '.join(k for k in metrics if k not in ('loss', 'ppl'))}; the runs and their evaluations "
                        "are saved, so rerunning with one of these reuses them")
    return metrics[metric]


def aggregate(results: dict, methods: list[str], seeds: list[int], metric: str | None = None) -> dict:
    """Per method: the per-seed curves of ``metric`` (default: the task's primary) and their mean (per rank, AURAC,
    log-AURAC)."""
    first = next(iter(results.values()))[seeds[0]]
    ranks = first["ranks"]
    out = {"task": first["task"], "metric": metric or first["metric"], "ranks": ranks, "seeds": seeds,
           "pretrained": _metric_value(first, None, metric), "methods": {}}
    for m in methods:
        per_seed = {}
        for s in seeds:
            curve = [_metric_value(results[m][s], r, metric) for r in results[m][s]["per_rank"]]
            per_seed[str(s)] = {"per_rank": curve, "aurac": aurac(ranks, curve), "run_dir": results[m][s]["run_dir"]}
            if "log_aurac" in first:
                per_seed[str(s)]["log_aurac"] = log_aurac(ranks, curve)
        out["methods"][m] = over_seeds(per_seed)
    return out


def over_seeds(per_seed: dict) -> dict:
    """A method's entry from its per-seed entries ({seed: {"per_rank", "aurac", ["log_aurac"], "run_dir"}}): the
    mean curve, mean AURAC and log-AURAC, and AURAC's sample standard deviation when there are several seeds."""
    entries = list(per_seed.values())
    entry = {"per_rank": [statistics.fmean(vs) for vs in zip(*(e["per_rank"] for e in entries))],
             "aurac": statistics.fmean(e["aurac"] for e in entries), "per_seed": per_seed}
    if all("log_aurac" in e for e in entries):
        entry["log_aurac"] = statistics.fmean(e["log_aurac"] for e in entries)
    if len(entries) > 1:
        entry["aurac_stdev"] = statistics.stdev(e["aurac"] for e in entries)
    return entry


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict) -> str:
    """One row per method (mean over seeds), one column per rank, then AURAC and log-AURAC; best AURAC in bold."""
    ranks = summary["ranks"]
    head = ["method"] + [f"r={k}" for k in ranks] + ["AURAC", "log-AURAC"]
    best = max(e["aurac"] for e in summary["methods"].values())
    lines = [f"{summary['task']}: {summary['metric']} (%), mean over seeds {summary['seeds']}; "
             f"pretrained (no adapter): {_pct(summary['pretrained'])}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, e in summary["methods"].items():
        a = _pct(e["aurac"])
        if len(summary["methods"]) > 1 and e["aurac"] == best:
            a = f"**{a}**"
        cells = [m] + [_pct(v) for v in e["per_rank"]] + [a, _pct(e.get("log_aurac"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """Every method's mean curve vs rank on a log2 axis, the pretrained level as a dashed line."""
    from .evaluate import plot_rank_curves

    curves = {f"{m} (AURAC {100 * e['aurac']:.1f})": e["per_rank"] for m, e in summary["methods"].items()}
    title = f"{summary['task']}: mean over seeds {', '.join(map(str, summary['seeds']))}"
    plot_rank_curves(curves, summary["ranks"], summary["pretrained"], summary["metric"], title, path)


def write_summary(summary: dict, output_dir: str) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "compare.json"), "md": os.path.join(output_dir, "compare.md"),
             "png": os.path.join(output_dir, "compare.png")}
    write_json(paths["json"], summary)
    write_text(paths["md"], markdown(summary))
    plot(summary, paths["png"])
    return paths


def compare(config_path: str | None, methods: list[str], seeds: list[int], output_dir: str,
            overrides: dict | None = None, eval_options: dict | None = None, metric: str | None = None,
            pretrained_from: str | None = None) -> dict:
    """Train and evaluate every (method, seed); return the summary (also written to ``output_dir``).

    Args:
        config_path: a train YAML (None: the train defaults).
        methods: from ``ALL_METHODS``; ``lora-svd`` reuses (or trains) the ``lora`` run of each seed.
        seeds: one run per seed and method.
        output_dir: runs go to ``output_dir/<method>/seed-<s>``; compare.json/.md/.png at the top.
        overrides: train config keys that win over the file (as ``--key value`` on the command line).
        eval_options: keyword arguments of ``evaluate_run`` (task, ranks, shots, limit, batch_size, ...).
        metric: the per-rank metric tabulated (default: the task's primary, e.g. exact_match_strict for GSM8K,
            or token_acc with ``score_only``); "token_acc" is the teacher-forced accuracy of the reference answer's
            tokens.
        pretrained_from: the eval folder of an earlier run on the same base model, whose score of the base model
            every run here reuses when its settings match (as runs within one compare do).

    Raises:
        UserError: a bad config, method, seed or metric (before anything is trained).
    """
    from . import train as train_mod
    from .evaluate import default_eval_dir, evaluate_run

    file_values = train_mod.read_yaml(config_path) if config_path else {}
    overrides, eval_options = dict(overrides or {}), dict(eval_options or {})
    lm_eval_task = (eval_options.get("task") or "").startswith("lm-eval:")
    check_metric(metric, lm_eval_task, eval_options.get("score_only", False))
    if metric and lm_eval_task:
        eval_options["metric"] = metric  # lm-eval's own metric key becomes each rank's primary value
    for key in ("method", "seed", "output_dir"):
        file_values.pop(key, None)
    train_mod.build_config(file_values, {**overrides, "output_dir": output_dir}, source=config_path or "command line")
    trained = [m for m in methods if m != SVD]
    if SVD in methods and "lora" not in trained:
        trained.append("lora")
    started = time.perf_counter()
    results, first_eval = {m: {} for m in methods}, pretrained_from
    for seed in seeds:
        for m in trained + ([SVD] if SVD in methods else []):
            run_dir = os.path.join(output_dir, m, f"seed-{seed}")
            print(f"\n=== matryoshka-lora compare: {m}, seed {seed} ===", flush=True)
            if m == SVD:
                make_svd_run(results.get("lora", {}).get(seed, {}).get("run_dir") or
                             os.path.join(output_dir, "lora", f"seed-{seed}"), run_dir)
            else:
                train_or_reuse(file_values, overrides, m, seed, run_dir, config_path or "command line")
            if m not in methods:  # the lora run lora-svd was made from: nobody asked for its scores
                continue
            eval_dir = default_eval_dir(run_dir, score_only=eval_options.get("score_only", False))
            if first_eval:
                share_pretrained(first_eval, eval_dir)
            result = evaluate_run(run_dir, output_dir=eval_dir, **eval_options)
            first_eval = first_eval or eval_dir
            results.setdefault(m, {})[seed] = result
    summary = aggregate(results, methods, seeds, None if lm_eval_task else metric)
    summary["seconds_total"] = round(time.perf_counter() - started, 1)
    paths = write_summary(summary, output_dir)
    print("\n" + markdown(summary))
    print(f"table: {paths['md']}\nplot:  {paths['png']}\ndata:  {paths['json']}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora compare",
        description="Train each method with the same config and seeds, evaluate all at the same ranks, and write "
                    "one side-by-side table (per-rank values, AURAC, log-AURAC, mean over seeds) and one plot. "
                    "Any train config key may follow as --key value (see matryoshka-lora train --help).",
        epilog="example: matryoshka-lora compare configs/smollm2-arithmetic.yaml --seeds 0 "
               "--methods matryoshka,lora,lora-svd --max_steps 60 --limit 40")
    p.add_argument("config", nargs="?", help="train YAML shared by every run (default: the train defaults)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma-separated seeds (default: {DEFAULT_SEEDS}, the paper's)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(ALL_METHODS)} (default: {DEFAULT_METHODS})")
    p.add_argument("--output_dir", default=None, help="default: runs/compare-<config name>")
    p.add_argument("--task", default=None, help="eval task (default: the config's data): gsm8k, arithmetic, a JSONL "
                                                "file or lm-eval:<task>")
    p.add_argument("--ranks", default=None, help="eval ranks, e.g. 1,2,4,8 (default: the train ranks)")
    p.add_argument("--shots", type=int, default=None, help="few-shot exemplars per eval prompt (default 0)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test examples (default: all)")
    p.add_argument("--eval_batch_size", dest="batch_size", type=int, default=16, help="prompts per eval batch")
    p.add_argument("--max_new_tokens", type=int, default=256, help="generation budget per answer")
    p.add_argument("--score_only", action="store_true",
                   help="evaluate by teacher-forced metrics alone (token_acc, loss; acc for multiple choice), without "
                        "generation: several times faster, no exact match; into RUN_DIR/eval-score")
    p.add_argument("--metric", default=None,
                   help="the per-rank metric tabulated (default: the task's primary). Built-in tasks: "
                        "exact_match_strict, exact_match_flexible (gsm8k), exact_match (completion), acc, acc_norm "
                        "(choice), token_acc (all: teacher-forced accuracy of the answer tokens); lm-eval tasks: "
                        "their metric key, e.g. acc_norm,none")
    return p


def split_train_overrides(rest: list[str]) -> dict:
    """The ``--key value`` train overrides among the arguments compare does not know itself."""
    from . import train as train_mod

    args, unknown = train_mod.parser().parse_known_args(rest)
    if unknown:
        bad = [u for u in unknown if u.startswith("-")] or unknown
        key = bad[0].lstrip("-").split("=", 1)[0]
        raise UserError(train_mod.unknown_key_problem(key) if bad[0].startswith("--")
                        else f"unexpected argument {bad[0]!r}")
    if args.config:
        raise UserError(f"unexpected argument {args.config!r} (one CONFIG.yaml at most; values follow their --key)")
    return {k: v for k, v in vars(args).items() if k != "config"}


def split_argv(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(this command's arguments, the train ``--key value`` overrides), so that a train value is never taken
    for the positional CONFIG."""
    own = {o for a in parser._actions for o in a.option_strings}
    mine, train = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token == "-":
            mine.append(token)
            i += 1
            continue
        takes_value = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        group = mine if token.split("=", 1)[0] in own else train
        group += argv[i:i + 1 + takes_value]
        i += 1 + takes_value
    return mine, train


def main(argv) -> int:
    parser = build_parser()
    mine, rest = split_argv(list(argv), parser)
    args = parser.parse_args(mine)
    overrides = split_train_overrides(rest)
    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else "defaults"
    output_dir = args.output_dir or os.path.join("runs", f"compare-{stem}")
    eval_options = {k: getattr(args, k) for k in EVAL_OPTIONS if getattr(args, k) is not None}
    if "ranks" in eval_options:
        eval_options["ranks"] = parse_ranks(eval_options["ranks"])
    compare(args.config, methods, seeds, output_dir, overrides, eval_options, args.metric)
    return 0
