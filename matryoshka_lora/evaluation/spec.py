"""EvalSpec: what an evaluation asks for, checked once, and the settings its stored results depend on."""
import dataclasses
import os
from dataclasses import dataclass, field

from ..errors import UserError

FORMAT_VERSION = 1


@dataclass
class EvalSpec:
    """An evaluation of a run at rank 0 (the base model) and at each requested rank.

    Args:
        task: "gsm8k", "arithmetic", a JSONL file or folder, or "lm-eval:<task>" (default: the run's data).
        ranks: ranks to evaluate (default: the run's train ranks).
        shots: few-shot exemplars per prompt (from the train split, or ``fewshot_data``); None: 0, or the
            lm-eval task's own default.
        limit: evaluate the first ``limit`` test examples.
        batch_size: prompts per batch (a stacked batch holds ``batch_size × len(ranks)`` rows).
        max_new_tokens: generation budget.
        output_dir: where results go (default ``RUN_DIR/eval``, see ``results.default_eval_dir``).
        stacked: all ranks in one pass with per-example ranks (False: one rank after another).
        dtype, device: how the model is loaded (device default: cuda if available).
        quantization: load the base "none", "4bit" or "8bit" (bitsandbytes); None: as the run was trained.
        attn_implementation: attention kernel; "eager" keeps stacked results bitwise equal to sequential
            ones on CPU; None keeps the model's.
        fewshot_data: where exemplars come from (default: the task's train split).
        fewshot_seed: seed of the exemplar draw (lm-eval's default).
        include_path: folder of custom lm-eval task YAMLs (``lm-eval:`` tasks only).
        metric: the primary metric of an ``lm-eval:`` task, e.g. "acc_norm,none" (default: see lmeval.py).
        stop: stop strings added to the task's (e.g. "\\n\\n" to end zero-shot gsm8k answers at a blank line).
        progress: show progress bars.
        inference: "paper" or "prefix" to read the trained weights under that rule instead of the run's own
            (results then go to ``RUN_DIR/eval-<inference>`` by default).
        score_only: teacher-forced metrics alone (token_acc, loss, ppl; acc and acc_norm of choice tasks): no
            generation, hence no exact match, and token_acc becomes the primary metric of generation tasks.
            Generation is most of an evaluation's time, so this suits sweeps. Results go to
            ``RUN_DIR/eval-score`` (``eval-<inference>-score``) by default.
        data_options: how ``task`` is read when it is the run's own data: the run's ``data_config``,
            ``data_format``, ``data_columns``, ``data_split`` (few-shot exemplars) and ``eval_split`` (the items),
            only those that differ from their defaults (``evaluate_run`` fills it from train_config.yaml).
        engine: "vllm" to evaluate through vLLM's OpenAI-compatible server (``serve``), started for the run and
            stopped after, or the one at ``engine_url``; results go to ``RUN_DIR/eval-vllm`` by default.
        engine_url: a running ``matryoshka-lora serve`` of this run to evaluate on (implies ``engine="vllm"``).
        engine_python: the interpreter that has vLLM (see ``serving.engine_python``).
    """

    task: str | None = None
    ranks: list[int] | None = None
    shots: int | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    output_dir: str | None = None
    stacked: bool = True
    dtype: str = "float32"
    device: str | None = None
    quantization: str | None = None
    attn_implementation: str | None = "eager"
    fewshot_data: str | None = None
    fewshot_seed: int = 1234
    include_path: str | None = None
    metric: str | None = None
    stop: list[str] = field(default_factory=list)
    progress: bool = True
    inference: str | None = None
    score_only: bool = False
    data_options: dict | None = None
    engine: str | None = None
    engine_url: str | None = None
    engine_python: str | None = None

    @property
    def lm_eval_task(self) -> str | None:
        """The lm-eval task name of an ``lm-eval:<task>`` task, else None."""
        return self.task[len("lm-eval:"):] if self.task and self.task.startswith("lm-eval:") else None

    def check(self) -> None:
        """Raises: UserError for the first option outside what is valid."""
        checks = (("shots", 0 if self.shots is None else self.shots, 0), ("batch_size", self.batch_size, 1),
                  ("max_new_tokens", self.max_new_tokens, 1))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"--{name} {value!r} is not valid; give an integer >= {low}")
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UserError(f"--limit {limit!r} is not valid; give a positive integer (or leave it out for all)")
        if self.engine not in (None, "vllm"):
            raise UserError(f"--engine {self.engine!r} is not valid; give vllm (or leave it out: this process)")
        if self.lm_eval_task is not None and self.score_only:
            raise UserError(f"--score_only does not apply to {self.task!r}: lm-eval runs its own task (its metrics "
                            "are the task's); use a built-in task (gsm8k, arithmetic, a JSONL file) or leave "
                            "--score_only out")

    def settings(self, base_model, adapter_sha256: str, read_as: str | None) -> dict:
        """What a stored rank result depends on, besides the items (batch size and stacking do not change
        results, see generate.py; lm-eval's own batching does)."""
        lm_eval = self.lm_eval_task is not None
        settings = {  # a built-in task's shots default to 0; an lm-eval task's None means its own default
            "format": FORMAT_VERSION, "task": self.task, "shots": self.shots if lm_eval else self.shots or 0,
            "limit": self.limit,
            "max_new_tokens": self.max_new_tokens, "fewshot_seed": self.fewshot_seed, "stop": list(self.stop),
            "dtype": self.dtype, "attn_implementation": self.attn_implementation, "base_model": base_model,
            "adapter_sha256": adapter_sha256,
        }
        if read_as:  # only then, so results stored before this option existed still match
            settings["inference"] = read_as
        if self.quantization not in (None, "none"):  # likewise
            settings["quantization"] = self.quantization
        if self.score_only:  # likewise
            settings["score_only"] = True
        if self.data_options:  # likewise: a run on data read as 0.1 read it has none
            settings["data_options"] = dict(self.data_options)
        if self.engine or self.engine_url:  # likewise
            settings["engine"] = "vllm"
        if lm_eval:
            settings.update(metric=self.metric, include_path=self.include_path and os.path.abspath(self.include_path),
                            batch_size=self.batch_size)
        return settings

    def replace(self, **changes) -> "EvalSpec":
        return dataclasses.replace(self, **changes)
