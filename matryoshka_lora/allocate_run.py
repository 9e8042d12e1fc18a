"""``allocate_run``: per-layer rank profiles of a run at one or several budgets, written as PEFT adapters.

Output (``output_dir``, default ``RUN_DIR/profiles``), per budget ``budget-<B>/``:
    rank_profile.json   module -> rank, parameters, calibration loss, how it was found
    adapter/            a standard PEFT adapter (``rank_pattern``; the gates folded into ``lora_B``)
    padded/             the same function at one rank for every layer (zero slices up to the profile's maximum), for
                        engines that need a single rank (vLLM)
and ``profiles.json`` / ``profiles.md`` / ``profiles.png``: every budget next to the uniform ranks, by parameters,
calibration loss and (``eval_limit`` > 0) answer-token accuracy and loss on the run's eval split (the first
``eval_limit`` examples, as ``eval --limit`` takes them), plotted against adapter parameters.
"""
import os
import re

import torch

from .adapter_io import load_run, read_adapter
from .allocate import check_budget, grid_ranks, search
from .profile_scores import answer_scores, full_params, module_costs
from .data import load_examples
from .errors import InvalidInput, UserError
from .features import Collator, tokenize_examples
from .files import atomic_dir, write_json, write_text
from .profiles import A_KEY, B_KEY, KEY_PREFIX, adapted_modules, export_profile
from .report import plot_profiles
from .rundir import read_train_config
from .training.config import TrainConfig

PROFILES_DIR = "profiles"
PROFILE_FILE = "rank_profile.json"
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")


def parse_budget(text: str, full: int) -> int:
    """Parameters of a budget: a share of the full adapter ("0.25") or a count ("1.2M", "300k", "150000").

    Raises:
        UserError: anything else.
    """
    match = _COUNT.match(str(text).strip())
    if not match or (not match.group(2) and float(match.group(1)) > 1 and "." in match.group(1)):
        raise UserError(f"budget {text!r} is not valid; give a share of the full adapter such as 0.25, or a "
                        f"parameter count such as 1.2M (the full adapter has {full:,})")
    value, unit = float(match.group(1)), match.group(2).lower()
    if not unit and value <= 1:
        return int(value * full)
    return int(value * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit])


def adapter_costs(run_dir: str) -> tuple:
    """(the run's MatryoshkaConfig, {module: parameters of one rank}) from its adapter files alone."""
    config, _, weights = read_adapter(run_dir)
    # lora_A (R, in), lora_B (out, R): one rank of a module holds in + out parameters
    return config, {m: weights[KEY_PREFIX + m + A_KEY].shape[1] + weights[KEY_PREFIX + m + B_KEY].shape[0]
                    for m in adapted_modules(weights)}


def checked_budgets(run_dir: str, budgets: list[str], grid: str) -> list[int]:
    """The budgets in parameters, checked against the run's adapter files (nothing is loaded but them).

    Raises:
        UserError: a budget that is not a share or count, or that no profile can use.
    """
    config, costs = adapter_costs(run_dir)
    full = config.rank * sum(costs.values())
    try:
        ranks = grid_ranks(config, grid)
        asked = [parse_budget(b, full) for b in budgets]
        for b in asked:
            check_budget(b, costs, ranks, full)
    except InvalidInput as e:
        raise UserError(str(e)) from None
    return asked


def calibration_batches(run_dir: str, tokenizer, data: str | None, split: str | None, limit: int, seed: int,
                        batch_size: int) -> tuple[list[dict], str]:
    """Batches of ``limit`` examples held out from training (default: the run's data and split, the examples after
    the ``max_examples`` it trained on, ``limit`` of the next 4·limit drawn with ``seed``); and a description."""
    config, defaults = read_train_config(run_dir), TrainConfig()
    options = _read_as_trained(config)
    own = data is None
    data = data or config.get("data") or defaults.data
    split = split or config.get("data_split", defaults.data_split)
    skip = (config.get("max_examples") or 0) if own else 0
    pool = load_examples(data, split, skip + 4 * limit if skip else None, tokenizer, seed=config.get("seed", 0),
                         **options)
    held_out = pool[skip:] or pool  # a run that trained on all of its split: calibrate on it, and say so
    note = "" if len(pool) > skip else " (the run trained on all of it: not held out)"
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    batches, n = _batches([held_out[i] for i in sorted(order)], tokenizer, config, batch_size)
    if not batches:
        raise UserError(f"calibration data {data} ({split}) has no example with an answer token left")
    return batches, f"{n} examples of {data} ({split}, after the first {skip}){note}"


def _read_as_trained(config: dict) -> dict:
    """``load_examples`` options that read data as the run read it (a key a 0.1 run lacks: its default)."""
    defaults = TrainConfig()
    return {k: config.get(k, getattr(defaults, k)) for k in ("data_format", "data_columns", "data_config")}


def _batches(examples: list[dict], tokenizer, config: dict, batch_size: int) -> tuple[list[dict], int]:
    """(padded batches, examples kept) of ``examples`` tokenized at the run's ``max_length``."""
    features, _ = tokenize_examples(examples, tokenizer, config.get("max_length", TrainConfig().max_length))
    collate = Collator(tokenizer.pad_token_id)
    return [collate(features[i:i + batch_size]) for i in range(0, len(features), batch_size)], len(features)


def allocate_run(run_dir: str, budgets: list[str], data: str | None = None, split: str | None = None,
                 limit: int = 32, grid: str = "train", score: str = "drop", refine: int = 3, candidates: int = 8,
                 seed: int = 0, batch_size: int = 8, batch_rows: int = 32, output_dir: str | None = None,
                 eval_limit: int = 64) -> dict:
    """Allocate a profile per budget for the run in ``run_dir`` and write them (see the module docstring).

    Raises:
        UserError: a bad budget, option or run folder.
    """
    asked = checked_budgets(run_dir, budgets, grid)  # before anything loads
    model, tokenizer, _ = load_run(run_dir)
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    full = full_params(model)
    batches, about = calibration_batches(run_dir, tokenizer, data, split, limit, seed, batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    try:
        results, uniform_losses = search(model, batches, asked, grid, score, refine, candidates, batch_rows)
    except InvalidInput as e:
        raise UserError(str(e)) from None
    out = output_dir or os.path.join(run_dir, PROFILES_DIR)
    uniform = _uniform(model, uniform_losses)
    costs = module_costs(model)
    rows = []
    for label, result in zip(budgets, results):
        record = {"budget": label, "budget_params": result.budget, "params": result.params,
                  "share": result.params / full, "calibration_loss": result.loss, "full_params": full,
                  "grid": grid, "score": score, "refine": refine, "seed": seed, "calibration": about,
                  "forward_passes": result.forward_passes,
                  "modules": {m: {"rank": k, "params": k * costs[m]} for m, k in result.profile.items()}}
        folder = os.path.join(out, f"budget-{label}")
        with atomic_dir(folder) as tmp:
            write_json(os.path.join(tmp, PROFILE_FILE), record)
            export_profile(model, result.profile, os.path.join(tmp, "adapter"))
            export_profile(model, result.profile, os.path.join(tmp, "padded"), pad=True)
        rows.append(dict({k: v for k, v in record.items() if k != "modules"}, folder=folder))
    summary = {"run_dir": os.path.abspath(run_dir), "full_params": full, "uniform": uniform, "profiles": rows}
    if eval_limit:
        profiles = [dict.fromkeys(costs, u["rank"]) for u in uniform] + [r.profile for r in results]
        _evaluate(model, tokenizer, run_dir, summary, profiles, eval_limit, batch_size, batch_rows, device)
        plot_profiles(summary, os.path.join(out, "profiles.png"))
    write_json(os.path.join(out, "profiles.json"), summary)
    write_text(os.path.join(out, "profiles.md"), profiles_table(summary))
    return summary


def _evaluate(model, tokenizer, run_dir, summary, profiles, limit, batch_size, batch_rows, device) -> None:
    """Answer-token accuracy and loss of every uniform rank and profile (and the base) on the run's eval split."""
    config, defaults = read_train_config(run_dir), TrainConfig()
    data, split = config.get("data") or defaults.data, config.get("eval_split", defaults.eval_split)
    examples = load_examples(data, split, limit, tokenizer, seed=config.get("seed", 0), turns="last",
                             **_read_as_trained(config))
    batches, n = _batches(examples, tokenizer, config, batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    off = dict.fromkeys(profiles[0], 0)
    losses, accs = answer_scores(model, batches, profiles + [off], batch_rows)
    scored = [{"loss": float(l), "token_acc": float(a)} for l, a in zip(losses, accs)]
    for entry, result in zip(summary["uniform"] + summary["profiles"], scored):
        entry["eval"] = result
    summary["base"] = scored[-1]
    summary["eval_data"] = f"{data} ({split}), first {n} examples"


def _uniform(model, losses: dict[int, float]) -> list[dict]:
    """The uniform train ranks on the same calibration set (the losses the search measured), for comparison."""
    per_rank, full = sum(module_costs(model).values()), full_params(model)
    return [{"rank": k, "params": k * per_rank, "share": k * per_rank / full, "calibration_loss": loss}
            for k, loss in losses.items()]


def profiles_table(summary: dict) -> str:
    scored = "base" in summary
    head = "| adapter | parameters | share of full | calibration loss |"
    lines = [head + (" eval loss | eval answer-token accuracy |" if scored else ""),
             "|---|---|---|---|" + ("---|---|" if scored else "")]
    entries = [(f"uniform rank {u['rank']}", u) for u in summary["uniform"]]
    entries += [(f"profile, budget {p['budget']}", p) for p in summary["profiles"]]
    for name, e in sorted(entries, key=lambda x: (x[1]["params"], x[0])):
        row = f"| {name} | {e['params']:,} | {e['share']:.1%} | {e['calibration_loss']:.4f} |"
        if scored:
            row += f" {e['eval']['loss']:.4f} | {e['eval']['token_acc']:.2%} |"
        lines.append(row)
    if scored:
        lines.append(f"\nbase model (no adapter): eval loss {summary['base']['loss']:.4f}, answer-token accuracy "
                     f"{summary['base']['token_acc']:.2%}; eval data: {summary['eval_data']}")
    return "\n".join(lines) + "\n"
