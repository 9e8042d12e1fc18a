"""`--task lm-eval:<task>`: lm-evaluation-harness on the in-memory model at each rank, or through the engine.

lm-eval's ``HFLM`` wraps the already loaded PEFT model (no reload per rank, no request cache: ranks
share prompts, so a cache keyed by prompt would hand rank 1's answers to rank 2), and
``simple_evaluate`` runs the task once per rank under ``use_rank`` (rank 0: ``disable_adapter``).
Stacking ranks is not possible here: lm-eval batches requests itself and sees one model.
Hub tasks (``arc_challenge``, ``hellaswag``, ``gsm8k``) need hub access for their data; ``--include_path``
adds a folder of custom task YAMLs, e.g. over a local JSONL (``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: /path/test.jsonl}}``). Through the engine (``eval --engine vllm``) each rank
is lm-eval's own ``local-completions`` model pointed at the server under that rank's model name (``engine_lm``).
"""
import difflib
import json
import os
import time

from ..errors import UserError
from ..selection import use_rank
from .generate import PRETRAINED

# the primary metric when --metric is not given, first present wins: the gsm8k task's strict filter,
# then the length-normalised accuracy the Open LLM Leaderboard (and the paper's Table 2) reports
PREFERRED_METRICS = ("exact_match,strict-match", "acc_norm,none", "acc,none", "exact_match,none")


def _import():
    """lm-eval is an optional dependency (``pip install 'matryoshka-lora[eval]'``), imported on first use."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval:<task> needs lm-evaluation-harness: pip install 'lm-eval>=0.4.9' "
                        "(or pip install 'matryoshka-lora[eval]')") from None
    return lm_eval, HFLM, TaskManager


def task_manager(task: str, include_path: str | None = None):
    """A ``TaskManager`` that knows ``task``: the custom YAMLs alone when they define it (indexing
    lm-eval's ~15,000 built-in tasks takes seconds), else the built-ins plus ``include_path``.

    Raises:
        UserError: lm-eval is missing, ``include_path`` is not a folder, or no task (group, tag) has that name.
    """
    _, _, TaskManager = _import()
    if include_path is not None:
        if not os.path.isdir(include_path):
            raise UserError(f"--include_path {include_path!r} is not a folder of lm-eval task YAMLs")
        custom = TaskManager(include_path=include_path, include_defaults=False)
        if task in custom.all_tasks:
            return custom
    manager = TaskManager(include_path=include_path)
    if task not in manager.all_tasks:
        close = difflib.get_close_matches(task, sorted(manager.all_tasks), n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UserError(f"lm-eval knows no task {task!r}{hint} (custom YAMLs: --include_path FOLDER)")
    return manager


def pick_metric(task_results: dict, metric: str | None) -> str:
    """The primary metric key of one task's lm-eval results (``--metric`` or the first preferred present)."""
    numeric = [k for k, v in task_results.items() if isinstance(v, (int, float)) and "_stderr" not in k]
    if metric is not None:
        if metric not in numeric:
            raise UserError(f"--metric {metric!r} not among this task's metrics: {', '.join(sorted(numeric))}")
        return metric
    for name in PREFERRED_METRICS:
        if name in numeric:
            return name
    if not numeric:
        raise UserError(f"lm-eval returned no numeric metric: {task_results}")
    return sorted(numeric)[0]


def evaluate_rank(model, tokenizer, task: str, rank: int, batch_size: int = 8, **options) -> dict:
    """Run an lm-eval task on ``model`` at ``rank`` (0: the base model, adapter off), in this process.

    Args:
        model: a matryoshka PEFT model in memory.
        tokenizer: its tokenizer.
        task: an lm-eval task name (built in or from ``include_path``).
        rank: the rank, or 0 for the adapter switched off.
        batch_size: lm-eval batch size.
        **options: those of ``evaluate_lm``.

    Returns:
        ``{"rank", "value", "n", "seconds", "metric", "metrics", "samples"}``.
    """
    _, HFLM, _ = _import()
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with model.disable_adapter() if rank == PRETRAINED else use_rank(model, rank):
        return evaluate_lm(hflm, task, rank, **options)


def engine_lm(url: str, model_name: str, tokenizer, concurrent: int = 8, max_length: int | None = None):
    """lm-eval's own ``local-completions`` model on an OpenAI-compatible server (``serve``), as model ``model_name``.

    Requests go as token ids of ``tokenizer`` (the run's), so both paths score and generate from the same tokens.
    Generation requests go ``concurrent`` at a time (the engine batches them); loglikelihood requests one at a time,
    one prompt each: vLLM applies a LoRA slot to sampled positions only, so echoed prompt log-probabilities of
    requests batched together are wrong or fail (vLLM issue #16668; see engine.py).
    """
    _import()
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class OneScoreAtATime(LocalCompletionsAPI):
        def _loglikelihood_tokens(self, requests, **kwargs):
            kept, self._concurrent, self._batch_size = (self._concurrent, self._batch_size), 1, 1
            try:
                return super()._loglikelihood_tokens(requests, **kwargs)
            finally:
                self._concurrent, self._batch_size = kept

    try:
        lm = OneScoreAtATime(base_url=f"{url}/v1/completions", model=model_name, tokenizer_backend="none",
                             num_concurrent=concurrent, batch_size=1, max_length=max_length or 2048, max_retries=1)
    except ModuleNotFoundError as e:  # aiohttp, tenacity or requests: lm-eval's [api] extra
        raise UserError(f"lm-eval through the engine needs lm-eval's API extra ({e.name or e}): "
                        "pip install 'lm-eval[api]' (or pip install 'matryoshka-lora[eval]')") from None
    lm.tokenizer, lm.tokenizer_backend, lm.tokenized_requests = tokenizer, "huggingface", True
    return lm


def evaluate_lm(lm, task: str, rank: int, shots: int | None = None, limit: int | None = None,
                include_path: str | None = None, metric: str | None = None, max_new_tokens: int | None = None,
                manager=None) -> dict:
    """Run an lm-eval task on an lm-eval model ``lm`` that answers as ``rank``; the record of ``evaluate_rank``.

    Args:
        lm: an lm-eval ``LM`` (``HFLM`` under ``use_rank``, or ``engine_lm``).
        task: an lm-eval task name (built in or from ``include_path``).
        rank: the rank it answers as (0: the base model), for the record.
        shots: ``num_fewshot`` (None: the task's own default).
        limit: first ``limit`` documents.
        include_path: folder of custom task YAMLs.
        metric: primary metric key such as "acc_norm,none".
        max_new_tokens: ``max_gen_toks`` of generation tasks.
        manager: a ``TaskManager`` to reuse.
    """
    lm_eval, _, _ = _import()
    manager = manager or task_manager(task, include_path)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=shots, limit=limit, use_cache=None, cache_requests=False,
        task_manager=manager, log_samples=True, bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": max_new_tokens} if max_new_tokens else None)
    seconds = time.perf_counter() - start
    task_results = out["results"][task]
    key = pick_metric(task_results, metric)
    metrics = {k: float(v) for k, v in task_results.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    n_samples = out.get("n-samples", {}).get(task, {})
    n = int(n_samples.get("effective", n_samples.get("original", 0)) or 0)
    samples = [_sample(s) for s in out.get("samples", {}).get(task, [])]
    return {"rank": rank, "value": float(task_results[key]), "n": n, "seconds": round(seconds, 3), "metric": key,
            "metrics": metrics, "samples": samples}


def _sample(logged: dict) -> dict:
    """One lm-eval logged sample, JSON-ready: the prompt, the raw and filtered responses and the per-doc metrics."""
    arguments = logged.get("arguments") or [[""]]
    sample = {"doc_id": logged.get("doc_id"), "filter": logged.get("filter"), "prompt": arguments[0][0],
              "target": logged.get("target"), "resps": logged.get("resps"),
              "filtered_resps": logged.get("filtered_resps")}
    sample.update({m: logged.get(m) for m in logged.get("metrics", [])})
    return json.loads(json.dumps(sample, default=str))
