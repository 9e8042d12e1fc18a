"""``evaluate_profiles``: the per-layer rank profiles `allocate` wrote, evaluated next to the uniform ranks.

A profile runs the same task, with the same settings and backend, as ``evaluate_run``'s uniform ranks: the
built-in tasks with generation (exact match) and teacher-forced scores, or an lm-eval task, with the model under
``use_rank(model, profile)``, one profile per pass. The uniform ranks and the base model are ``evaluate_run``'s
own (reused when already evaluated).

Outputs, in the eval folder beside eval.json:
    profiles/budget-<B>.json   one record per profile, reused when rerun with the same settings and profile
    profiles_eval.json / .md   every uniform rank and profile by adapter parameters, with the primary metric
    params_curve.png           the metric against adapter parameters: the uniform-rank curve and the profile curve
"""
import glob
import json
import os

from ..allocate_run import PROFILE_FILE, PROFILES_DIR, adapter_costs
from ..errors import InvalidInput, UserError
from ..files import write_json, write_text
from ..profiles import check_profile, profile_ranks
from ..report import pct, plot_profiles
from .results import load_done_file, settings_hash
from .run import load_model, plan_eval, read_as_rule, run_plan
from .spec import EvalSpec

PROFILES_EVAL = "profiles_eval"
PARAMS_CURVE = "params_curve.png"


class LayerRanks(dict):
    """A profile as ``use_rank`` takes it (``{anchored module regex: rank}``) that keys results as an int rank
    does: hashable by content, and printed as its label in progress bars."""

    def __init__(self, ranks: dict, label: str):
        super().__init__(ranks)
        self.label = label

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def __str__(self):
        return self.label


def read_profiles(run_dir: str, folder: str, config, costs: dict[str, int]) -> list[dict]:
    """The ``rank_profile.json`` records under ``folder`` (``budget-*/``), fewest parameters first, each checked
    against the run's adapter.

    Raises:
        UserError: no profiles there, an unreadable record, or a profile that does not fit this run's adapter.
    """
    paths = glob.glob(os.path.join(folder, "budget-*", PROFILE_FILE))
    if not paths:
        raise UserError(f"no budget-*/{PROFILE_FILE} under {folder}; write profiles with "
                        f"`matryoshka-lora allocate {run_dir} --budget B` first")
    records = []
    for path in paths:
        try:
            with open(path) as f:
                record = json.load(f)
            profile = {m: v["rank"] for m, v in record["modules"].items()}
            check_profile(profile, list(costs), config.rank)
        except InvalidInput as e:  # before ValueError, which it is
            raise UserError(f"{path} does not fit the adapter of {run_dir} (a profile of another run?): {e}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is not a readable rank profile ({type(e).__name__}: {e})") from None
        records.append(dict(record, profile=profile, params=sum(k * costs[m] for m, k in profile.items())))
    return sorted(records, key=lambda r: (r["params"], r["budget"]))


def evaluate_profiles(run_dir: str, profiles_dir: str | None = None, spec: EvalSpec | None = None,
                      **options) -> dict:
    """Evaluate the run's uniform ranks (``evaluate_run``) and every profile under ``profiles_dir`` (default
    ``RUN_DIR/profiles``) on one task; write the outputs of the module docstring.

    Returns:
        The profiles_eval.json dict.

    Raises:
        UserError: bad run, profiles, task or options; ``--engine`` (profiles are evaluated in-process).
    """
    plan = plan_eval(run_dir, spec, **options)
    if plan.spec.engine:
        raise UserError("--profiles evaluates in this process; to serve a profile, give vLLM its exported "
                        "budget-*/adapter (or padded/) folder with --lora-modules")
    config, costs = adapter_costs(run_dir)  # the run's adapter files, read once
    records = read_profiles(run_dir, profiles_dir or os.path.join(run_dir, PROFILES_DIR), config, costs)
    out = plan.spec.output_dir
    folder = os.path.join(out, "profiles")
    scored = [_stored_profile(plan, r, folder) for r in records]
    # the model loads only when something is left to compute (run_plan loads it itself for pending ranks)
    loaded = load_model(run_dir, plan.spec) if None in scored else None
    result = run_plan(run_dir, plan, loaded)
    if loaded:
        with read_as_rule(loaded[0], plan.config):
            scored = [s or _score_profile(plan, *loaded, r, folder) for r, s in zip(records, scored)]
    per_rank = sum(costs.values())
    summary = _summary(config.rank * per_rank, per_rank, result, records, scored) | {"output_dir": os.path.abspath(out)}
    write_json(os.path.join(out, PROFILES_EVAL + ".json"), summary)
    write_text(os.path.join(out, PROFILES_EVAL + ".md"), profiles_eval_table(summary))
    plot_profiles(summary, os.path.join(out, PARAMS_CURVE))
    return summary


def _profile_file(plan, record: dict, folder: str) -> tuple[str, str]:
    """(the file of a profile's evaluation record, the digest of the settings it holds)."""
    digest = settings_hash(dict(plan.settings, profile=record["profile"]), plan.backend.items, with_adapter=True)
    return os.path.join(folder, f"budget-{record['budget']}.json"), digest


def _stored_profile(plan, record: dict, folder: str) -> dict | None:
    """A profile's evaluation record stored under the same settings, or None."""
    path, digest = _profile_file(plan, record, folder)
    done = load_done_file(path, digest)
    if done is not None:
        print(f"matryoshka-lora eval: reusing the finished profile budget {record['budget']} from {path}", flush=True)
    return done


def _score_profile(plan, model, tokenizer, record: dict, folder: str) -> dict:
    """Evaluate one profile in one pass under ``use_rank`` and store its record."""
    path, digest = _profile_file(plan, record, folder)
    label = f"budget {record['budget']}"
    key = LayerRanks(profile_ranks(record["profile"]), label)
    done = plan.backend.run(model, tokenizer, [key])[key]
    done.update(rank=label, settings_hash=digest)
    write_json(path, done, indent=1)
    return done


def _summary(full: int, per_rank: int, result: dict, records: list[dict], scored: list[dict]) -> dict:
    """profiles_eval.json's dict; ``full`` and ``per_rank``: parameters of the full adapter and of one rank."""
    uniform = [{"rank": r["rank"], "params": r["rank"] * per_rank, "share": r["rank"] * per_rank / full,
                "eval": r["metrics"]} for r in result["per_rank"]]
    profiles = [{"budget": r["budget"], "params": r["params"], "share": r["params"] / full,
                 "calibration_loss": r.get("calibration_loss"), "eval": s["metrics"]} for r, s in zip(records, scored)]
    n = result["per_rank"][0]["n"]
    return {"run_dir": result["run_dir"], "task": result["task"], "metric": result["metric"], "full_params": full,
            "uniform": uniform, "profiles": profiles, "base": result["pretrained_metrics"],
            "eval_data": f"{result['task']}: {n} examples, {result['metric']}"}


def profiles_eval_table(summary: dict) -> str:
    """Markdown: every uniform rank and profile by parameters, with the primary metric; the base model below."""
    metric = summary["metric"]
    lines = [f"| adapter | parameters | share of full | {metric} (%) |", "|---|---|---|---|"]
    entries = [(f"uniform rank {u['rank']}", u) for u in summary["uniform"]]
    entries += [(f"profile, budget {p['budget']}", p) for p in summary["profiles"]]
    for name, e in sorted(entries, key=lambda x: (x[1]["params"], x[0])):
        lines.append(f"| {name} | {e['params']:,} | {e['share']:.1%} | {pct(e['eval'][metric])} |")
    lines.append(f"\nbase model (no adapter): {pct(summary['base'][metric])}; {summary['eval_data']}")
    return "\n".join(lines) + "\n"
