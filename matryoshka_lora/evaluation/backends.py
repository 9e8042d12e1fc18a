"""The two ways a rank is evaluated: the built-in tasks (all ranks stacked in one pass) and lm-evaluation-harness.

Both give ``groups(pending ranks)`` (the passes) and ``run(model, tokenizer, group) -> {rank: record}``, a record
being ``{"rank", "value", "metric", "n", "seconds", "metrics", "samples"}``.
"""
import time

from .generate import generate_at_ranks, rank_passes, score_at_ranks
from .lmeval import evaluate_rank, task_manager
from .spec import EvalSpec
from .tasks import PRIMARY, load_task, rank_metrics, stop_strings


class BuiltinBackend:
    """gsm8k-style, completion and multiple-choice tasks, by generation and teacher-forced scoring."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        loaded = load_task(spec.task, spec.limit, spec.shots or 0, spec.fewshot_data, spec.fewshot_seed,
                           spec.data_options)
        self.kind, self.items = loaded["kind"], loaded["items"]

    def groups(self, pending: list[int]) -> list[list[int]]:
        return rank_passes(pending, self.spec.stacked)

    def run(self, model, tokenizer, group: list[int]) -> dict[int, dict]:
        """Evaluate the ranks of one pass (several when stacked): {rank: record}."""
        spec, kind, items = self.spec, self.kind, self.items
        common = dict(batch_size=spec.batch_size, stacked=True, progress=spec.progress,
                      max_length=getattr(model.config, "max_position_embeddings", None))
        start = time.perf_counter()
        completions = dict.fromkeys(group)  # None: choice tasks and score_only generate nothing
        if self.generates:
            completions = generate_at_ranks(model, tokenizer, [it["prompt"] for it in items], group,
                                            max_new_tokens=spec.max_new_tokens,
                                            stop=stop_strings(kind, tokenizer, spec.stop), **common)
        flat = score_at_ranks(model, tokenizer, self.pairs(), group, **common)
        return self.records(group, completions, flat, (time.perf_counter() - start) / len(group))

    @property
    def generates(self) -> bool:
        return self.kind != "choice" and not self.spec.score_only

    def records(self, group, completions: dict, flat: dict, seconds: float) -> dict[int, dict]:
        """{rank: record} from each rank's completions (None: none) and teacher-forced scores; ``seconds`` per rank
        (a stacked pass is shared by its ranks)."""
        primary = "token_acc" if self.spec.score_only and self.kind != "choice" else PRIMARY[self.kind]
        records = {}
        for k in group:
            metrics, samples = rank_metrics(self.kind, self.items, completions[k], self._per_item(flat[k]))
            records[k] = {"rank": k, "value": metrics[primary], "metric": primary, "n": len(self.items),
                          "seconds": round(seconds, 3), "metrics": metrics, "samples": samples}
        return records

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) to score: the reference answer, or each choice of a choice task."""
        if self.kind == "choice":
            return [(it["prompt"], " " + c) for it in self.items for c in it["choices"]]
        return [(it["prompt"], it["target"]) for it in self.items]

    def _per_item(self, scores: list) -> list:
        if self.kind != "choice":
            return scores
        it = iter(scores)
        return [[next(it) for _ in item["choices"]] for item in self.items]


class LmEvalBackend:
    """An lm-eval task, one rank at a time (lm-eval batches requests itself and sees one model)."""

    kind = "lm-eval"
    items: list = []

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        self.manager = task_manager(spec.lm_eval_task, spec.include_path)  # an unknown task fails early

    def groups(self, pending: list[int]) -> list[list[int]]:
        return [[k] for k in pending]

    def run(self, model, tokenizer, group: list[int]) -> dict[int, dict]:
        k = group[0]
        return {k: evaluate_rank(model, tokenizer, self.spec.lm_eval_task, k, batch_size=self.spec.batch_size,
                                 **self.options())}

    def options(self) -> dict:
        """``evaluate_lm``'s options from the spec (both the in-process and the engine path run the task so)."""
        s = self.spec
        return dict(shots=s.shots, limit=s.limit, include_path=s.include_path, metric=s.metric,
                    max_new_tokens=s.max_new_tokens, manager=self.manager)


def backend_for(spec: EvalSpec):
    return LmEvalBackend(spec) if spec.lm_eval_task is not None else BuiltinBackend(spec)
