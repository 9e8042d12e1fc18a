"""A bundle: a run's ranks exported as PEFT adapters plus ``nested_adapter.json``, the manifest ``serve`` reads.

``nested_adapter.json`` says what a deployer needs without loading anything: the base model, the method, per rank
its folder, parameters and bytes, the run's evaluation per rank and AURAC when the run has been evaluated, a
recommended rank (the smallest whose score is within ``tolerance`` of the best rank's), and the vLLM arguments that
serve every rank of the bundle at once. Rank folders already exported from the same adapter weights are reused.
"""
import json
import math
import os

from safetensors import safe_open

from .adapter_io import export_rank
from .config import MatryoshkaConfig
from .errors import UserError
from .files import file_digest, write_json
from .rundir import EVAL_JSON, WEIGHTS, default_eval_dir, read_train_config

MANIFEST = "nested_adapter.json"
BUNDLE_FORMAT = 1
DEFAULT_TOLERANCE = 0.01  # on the metric's 0-1 scale: one point of accuracy
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts as --max-lora-rank


def max_lora_rank(largest: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds rank ``largest``.

    Raises:
        UserError: ``largest`` is above vLLM's maximum (512).
    """
    for allowed in VLLM_LORA_RANKS:
        if allowed >= largest:
            return allowed
    raise UserError(f"rank {largest} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}); "
                    f"serve ranks up to {VLLM_LORA_RANKS[-1]}")


def lora_name(name: str, k: int) -> str:
    """The model name a client asks for to get rank ``k``: ``NAME@r4``."""
    return f"{name}@r{k}"


def recommended_rank(values: dict[int, float], tolerance: float = DEFAULT_TOLERANCE) -> int | None:
    """The smallest rank whose score is within ``tolerance`` of the best rank's (None without scores)."""
    if not values:
        return None
    best = max(values.values())
    return min(k for k, v in values.items() if v >= best - tolerance)


def run_evaluation(run_dir: str, adapter_sha256: str) -> dict | None:
    """The run's own evaluation of these adapter weights (``eval/``, else ``eval-score/``), or None."""
    for folder in (default_eval_dir(run_dir), default_eval_dir(run_dir, score_only=True)):
        path = os.path.join(folder, EVAL_JSON)
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if result.get("settings", {}).get("adapter_sha256") != adapter_sha256:
            continue  # evaluated before the adapter was retrained
        return {"path": os.path.relpath(path, run_dir), "task": result["task"], "metric": result["metric"],
                "limit": result.get("limit"), "pretrained": result["pretrained"],
                "per_rank": {str(r["rank"]): r["value"] for r in result["per_rank"]},
                "aurac": result["aurac"], "log_aurac": result.get("log_aurac")}
    return None


def _size(folder: str) -> tuple[int, int]:
    """(parameters, bytes) of the adapter weights in ``folder``."""
    path = os.path.join(folder, WEIGHTS)
    with safe_open(path, "pt") as f:
        params = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return params, os.path.getsize(path)


def read_manifest(out_dir: str) -> dict | None:
    """The bundle's manifest, or None when ``out_dir`` holds none (or an unreadable one)."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _reusable(manifest: dict | None, out_dir: str, k: int, digest: str) -> bool:
    """Rank ``k`` was exported into ``out_dir`` from these very weights."""
    return bool(manifest) and manifest.get("adapter_sha256") == digest and \
        os.path.isfile(os.path.join(out_dir, f"rank-{k}", WEIGHTS))


def checked_ranks(run_dir: str, ranks: list[int] | None) -> tuple[MatryoshkaConfig, list[int]]:
    """(the run's config, the sorted ranks to export: default its train ranks), before anything is written.

    Raises:
        UserError: no run folder, no adapter in it, or a rank outside 1..R.
    """
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir!r} not found")
    if not os.path.isfile(os.path.join(run_dir, WEIGHTS)):
        raise UserError(f"{run_dir} holds no adapter ({WEIGHTS}): give a folder written by `matryoshka-lora "
                        "train` (a run still training has its adapter only in checkpoints/)")
    config = MatryoshkaConfig.load(run_dir)
    ranks = sorted(set(ranks or config.train_ranks))
    bad = [k for k in ranks if not 1 <= k <= config.rank]
    if bad:
        raise UserError(f"--ranks {bad} outside 1..{config.rank} (the run's maximum rank); "
                        f"its train ranks are {','.join(map(str, config.train_ranks))}")
    return config, ranks


def export_bundle(run_dir: str, ranks: list[int] | None = None, out_dir: str | None = None,
                  tolerance: float = DEFAULT_TOLERANCE, name: str | None = None) -> dict:
    """Export ``ranks`` of the run (default: its train ranks) into ``out_dir`` and write ``nested_adapter.json``.

    Returns:
        The manifest.

    Raises:
        UserError: no run folder, no adapter in it, or a rank outside 1..R.
    """
    config, ranks = checked_ranks(run_dir, ranks)
    out_dir = out_dir or os.path.join(run_dir, "export")
    digest = file_digest(os.path.join(run_dir, WEIGHTS))
    old = read_manifest(out_dir)
    for k in ranks:
        if not _reusable(old, out_dir, k, digest):
            export_rank(run_dir, k, os.path.join(out_dir, f"rank-{k}"))
    manifest = _manifest(run_dir, config, ranks, out_dir, digest, tolerance,
                         name or os.path.basename(os.path.normpath(os.path.abspath(run_dir))))
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def _manifest(run_dir, config, ranks, out_dir, digest, tolerance, name) -> dict:
    train = read_train_config(run_dir)
    evaluation = run_evaluation(run_dir, digest)
    scores = {k: evaluation["per_rank"][str(k)] for k in ranks if evaluation and str(k) in evaluation["per_rank"]}
    rows = []
    for k in ranks:
        params, size = _size(os.path.join(out_dir, f"rank-{k}"))
        rows.append({"rank": k, "path": f"rank-{k}", "params": params, "bytes": size, "score": scores.get(k)})
    recommended = recommended_rank(scores, tolerance)
    return {
        "format": BUNDLE_FORMAT, "name": name, "run_dir": os.path.abspath(run_dir), "adapter_sha256": digest,
        "base_model": train.get("model"), "base_model_path": train.get("model_path"),
        "dtype": train.get("dtype", "float32"), "method": config.method, "max_rank": config.rank,
        "inference": config.inference, "ranks": rows, "evaluation": evaluation,
        "recommended_rank": recommended, "tolerance": tolerance,
        "recommendation": (f"rank {recommended}: the smallest within {tolerance} of the best rank's "
                           f"{evaluation['metric']}" if recommended else
                           f"none: evaluate the run first (matryoshka-lora eval {run_dir}), then export again"),
        "vllm": vllm_arguments(name, {k: os.path.join(out_dir, f"rank-{k}") for k in ranks}),
    }


def vllm_arguments(name: str, adapters: dict[int, str]) -> dict:
    """The LoRA arguments of vLLM's server for these rank folders: one slot per rank, so a mixed stream never
    swaps adapters, and the smallest ``max_lora_rank`` that holds the largest."""
    modules = {lora_name(name, k): os.path.abspath(path) for k, path in sorted(adapters.items())}
    return {"max_lora_rank": max_lora_rank(max(adapters)), "max_loras": len(adapters), "lora_modules": modules,
            "args": ["--enable-lora", "--max-lora-rank", str(max_lora_rank(max(adapters))), "--max-loras",
                     str(len(adapters)), "--lora-modules", *[f"{m}={p}" for m, p in modules.items()]]}
