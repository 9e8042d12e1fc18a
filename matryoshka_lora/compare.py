"""`matryoshka-lora compare CONFIG.yaml`: train every method with the same config and seeds, evaluate all at
the same ranks, and report one side-by-side table (per-rank values, AURAC, log-AURAC, means over seeds) and
one plot.

``lora-svd`` is a baseline the paper did not run: the trained plain-LoRA adapter truncated at rank k by the SVD
of its ΔW (the best rank-k approximation). It tells whether nested training beats post-hoc truncation.
"""
import json
import os
import shutil
import statistics
import time

from .errors import UserError
from .evaluation import evaluate_run
from .evaluation.generate import PRETRAINED
from .evaluation.results import default_eval_dir, file_digest, rank_file
from .evaluation.tasks import ACCURACY_METRICS, GENERATED_METRICS
from .files import read_yaml, write_json
from .methods import METHOD_NAMES
from .ranks import aurac, log_aurac
from .report import compare_markdown, write_compare_outputs
from .rundir import COMPLETE, SVD_SOURCE, TRAIN_CONFIG, WEIGHTS, latest_checkpoint, read_train_config
from .serving import engine_python
from .svd import svd_adapter
from .training import TrainConfig, build_config, train

SVD = "lora-svd"
SVD_TUNED = "lora-svd-dylora"  # LoRA, re-factored by SVD, then a short DyLoRA phase from there (issue 20)
TUNE_SHARE = 0.15  # the DyLoRA phase's share of the steps: the two phases together take the others' steps
ALL_METHODS = tuple(dict.fromkeys(METHOD_NAMES + (SVD, SVD_TUNED)))  # train knows lora-svd as well
DEFAULT_METHODS = "lora-svd,dylora,matryoshka,lora"  # the default of train first
DEFAULT_SEEDS = "42,666,2408"  # the paper's


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
    """Train one (method, seed) into ``run_dir``; a run with this config there is reused when finished, continued
    from its last checkpoint when not (resume is bit-exact), and replaced when its config differs."""
    config = build_config(file_values, {**overrides, "method": method, "seed": seed,
                                                  "output_dir": run_dir}, source=source)
    if _same_config(run_dir, config):
        if os.path.isfile(os.path.join(run_dir, COMPLETE)):
            print(f"matryoshka-lora compare: reusing the finished run {run_dir}", flush=True)
            return run_dir
        if (checkpoint := latest_checkpoint(run_dir)) is not None:  # a study stopped mid-run goes on from there
            print(f"matryoshka-lora compare: continuing the unfinished run {run_dir} from {checkpoint}", flush=True)
            config.resume = True
            return train(config)
    config.overwrite = os.path.isdir(run_dir)
    return train(config)


def _same_config(run_dir: str, config) -> bool:
    if not os.path.isfile(os.path.join(run_dir, TRAIN_CONFIG)):
        return False
    saved = read_train_config(run_dir)
    wanted = {k: v for k, v in vars(config).items() if k not in ("overwrite", "resume")}
    # a key the saved config lacks was added by a later version: the run used what is now its default
    defaults = TrainConfig()
    return all((saved[k] if k in saved else getattr(defaults, k)) == v for k, v in wanted.items())


def tuned_svd_run(file_values: dict, overrides: dict, seed: int, run_dir: str, source: str) -> str:
    """``lora-svd-dylora`` into ``run_dir``: plain LoRA for (1 - TUNE_SHARE) of max_steps (``run_dir-lora``), its
    SVD re-factoring (``run_dir-svd``), then DyLoRA from that adapter for the rest of the steps (scaling "none", as
    the re-factored weights are), so the whole costs what one run of max_steps costs.

    Raises:
        UserError: the config trains by epochs (max_steps -1): the phases are counted in steps.
    """
    steps = build_config(file_values, {**overrides, "output_dir": run_dir}, source=source).max_steps
    if steps < 2:
        raise UserError(f"{SVD_TUNED} splits max_steps between its phases; give max_steps >= 2, not {steps}")
    tune = max(1, round(TUNE_SHARE * steps))
    lora = train_or_reuse(file_values, {**overrides, "max_steps": steps - tune}, "lora", seed, run_dir + "-lora",
                          source)
    svd = make_svd_run(lora, run_dir + "-svd")
    return train_or_reuse(file_values, {**overrides, "max_steps": tune, "scaling": "none",
                                        "init_adapter": os.path.abspath(svd)}, "dylora", seed, run_dir, source)


def make_svd_run(lora_run: str, run_dir: str) -> str:
    """A run folder whose adapter is the SVD re-factoring of ``lora_run``'s (same tokenizer and train config).
    An existing one made from the same LoRA adapter is kept, so its evaluation is reused (the SVD may differ in
    the last bits between runs, which would change the adapter's hash)."""
    source = file_digest(os.path.join(lora_run, WEIGHTS))
    record = os.path.join(run_dir, SVD_SOURCE)
    if os.path.isfile(record) and os.path.isfile(os.path.join(run_dir, WEIGHTS)):
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
    src, dst = rank_file(first_eval_dir, PRETRAINED), rank_file(eval_dir, PRETRAINED)
    if os.path.isfile(src) and not os.path.isfile(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def check_metric(metric: str | None, lm_eval_task: bool, score_only: bool = False) -> None:
    """Fail before any training on a metric no built-in task reports (lm-eval tasks name their own), or one that
    needs the generation ``score_only`` skips."""
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
    file_values = read_yaml(config_path) if config_path else {}
    overrides, eval_options = dict(overrides or {}), dict(eval_options or {})
    lm_eval_task = (eval_options.get("task") or "").startswith("lm-eval:")
    check_metric(metric, lm_eval_task, eval_options.get("score_only", False))
    if eval_options.get("engine"):  # a missing vLLM fails now, not after hours of training
        eval_options["engine_python"] = engine_python(eval_options.get("engine_python"))
    if metric and lm_eval_task:
        eval_options["metric"] = metric  # lm-eval's own metric key becomes each rank's primary value
    for key in ("method", "seed", "output_dir"):
        file_values.pop(key, None)
    build_config(file_values, {**overrides, "output_dir": output_dir}, source=config_path or "command line")
    trained = [m for m in methods if m not in (SVD, SVD_TUNED)]
    if SVD in methods and "lora" not in trained:
        trained.append("lora")
    started = time.perf_counter()
    results, first_eval = {m: {} for m in methods}, pretrained_from
    for seed in seeds:
        for m in trained + [m for m in (SVD, SVD_TUNED) if m in methods]:
            run_dir = os.path.join(output_dir, m, f"seed-{seed}")
            print(f"\n=== matryoshka-lora compare: {m}, seed {seed} ===", flush=True)
            if m == SVD:
                make_svd_run(results.get("lora", {}).get(seed, {}).get("run_dir") or
                             os.path.join(output_dir, "lora", f"seed-{seed}"), run_dir)
            elif m == SVD_TUNED:
                tuned_svd_run(file_values, overrides, seed, run_dir, config_path or "command line")
            else:
                train_or_reuse(file_values, overrides, m, seed, run_dir, config_path or "command line")
            if m not in methods:  # the lora run lora-svd was made from: nobody asked for its scores
                continue
            eval_dir = default_eval_dir(run_dir, score_only=eval_options.get("score_only", False),
                                        engine=eval_options.get("engine"))
            if first_eval:
                share_pretrained(first_eval, eval_dir)
            result = evaluate_run(run_dir, output_dir=eval_dir, **eval_options)
            first_eval = first_eval or eval_dir
            results.setdefault(m, {})[seed] = result
    summary = aggregate(results, methods, seeds, None if lm_eval_task else metric)
    summary["seconds_total"] = round(time.perf_counter() - started, 1)
    paths = write_compare_outputs(summary, output_dir)
    print("\n" + compare_markdown(summary))
    print(f"table: {paths['md']}\nplot:  {paths['png']}\ndata:  {paths['json']}")
    return summary
