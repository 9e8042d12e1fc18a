"""Stored evaluation results: one file per finished rank, reused when rerun with the same settings.

``ranks/rank-K.json`` per finished rank (``ranks/pretrained.json`` for rank 0) holds the rank's metrics and every
completion with the hash of the settings that made it (data, shots, limit, generation and model settings, adapter
weights), so an interrupted evaluation resumes. ``summarize`` turns the records into eval.json's dict.
"""
import hashlib
import json
import os

from ..files import file_digest, write_json  # noqa: F401  (file_digest: read from here by older code)
from ..ranks import aurac, log_aurac
from ..rundir import EVAL_RANKS, default_eval_dir  # noqa: F401  (likewise)
from .generate import PRETRAINED
from .tasks import PRIMARY


def rank_file(output_dir: str, k: int) -> str:
    return os.path.join(output_dir, EVAL_RANKS, "pretrained.json" if k == PRETRAINED else f"rank-{k}.json")


def load_done(output_dir: str, k: int, settings_hash: str) -> dict | None:
    """The stored record of rank k, if it was computed with these settings."""
    return load_done_file(rank_file(output_dir, k), settings_hash)


def load_done_file(path: str, settings_hash: str) -> dict | None:
    """The record stored at ``path``, if it was computed with these settings."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("settings_hash") == settings_hash else None


def save_record(output_dir: str, k: int, record: dict, settings_hash: str) -> None:
    record["settings_hash"] = settings_hash
    write_json(rank_file(output_dir, k), record, indent=1)


def settings_hash(settings: dict, items: list[dict], with_adapter: bool) -> str:
    """What a stored rank result depends on: settings, every prompt and reference, and the adapter weights."""
    keys = dict(settings)
    if not with_adapter:  # the base model's score is the same whatever the adapter and its inference rule
        keys.pop("adapter_sha256", None)
        keys.pop("inference", None)
    payload = json.dumps({"settings": keys, "items": items}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def log_aurac_allowed(ranks) -> bool:
    """The paper defines log-AURAC for rank sets of powers of two (equally spaced on log2); we also need two."""
    return len(ranks) >= 2 and all(k & (k - 1) == 0 for k in ranks)


def summarize(task, kind, ranks, records, settings, config, run_dir, stacked) -> dict:
    """eval.json's dict: the primary metric per rank, the base model's, AURAC and log-AURAC, and the settings."""
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
