"""``evaluate_run``: a run at rank 0 (the base model, adapter off) and at every requested rank.

Outputs (``spec.output_dir``, default ``RUN_DIR/eval``): ``eval.json``, ``eval.md`` (the paper's Table 1 layout
plus one row per rank), ``rank_curve.png``, and the per-rank records of ``results.py`` (an interrupted evaluation
resumes). A rank's ``seconds`` is the wall time of the pass that computed it divided by the ranks in that pass (a
stacked pass is shared).
"""
import contextlib
import dataclasses
import os
import time

import torch

from ..adapter_io import load_run, read_checked
from ..config import MatryoshkaConfig
from ..errors import AdapterFileError, UserError
from ..report import write_eval_outputs
from ..files import file_digest
from ..rundir import TRAIN_CONFIG, WEIGHTS, default_eval_dir, read_train_config
from ..selection import matryoshka_state
from ..training.config import DATA_KEYS, TrainConfig
from .backends import backend_for
from .engine import engine_backend, engine_url, run_tokenizer
from .generate import PRETRAINED
from .results import load_done, save_record, settings_hash, summarize
from .spec import EvalSpec


@dataclasses.dataclass
class EvalPlan:
    """An evaluation ready to run: the spec with its defaults filled in, the run's config under the rule it is
    read by (``read_as``: that rule when it is not the run's own), the ranks, the settings its stored results
    depend on, and the backend that computes them."""

    spec: EvalSpec
    config: MatryoshkaConfig
    ranks: list[int]
    read_as: str | None
    settings: dict
    backend: object


def plan_eval(run_dir: str, spec: EvalSpec | None = None, **options) -> EvalPlan:
    """Check a run and an evaluation of it (``spec``, or its fields as ``options``) before anything loads.

    Raises:
        UserError / AdapterFileError: bad run folder, adapter file, task, or options.
    """
    spec = spec.replace(**options) if spec else EvalSpec(**options)
    if spec.engine_url:
        spec = spec.replace(engine="vllm")
    spec.check()
    config, ranks = check_run(run_dir, spec.ranks)
    read_as, config = _read_as(config, spec.inference)
    if spec.engine and read_as:
        raise UserError("--engine evaluates the ranks `serve` exports, under the run's own rule; leave out "
                        "--inference or --engine")
    train_config = read_train_config(run_dir)
    if not spec.task and spec.data_options is None:  # the run's data, read as it was trained on
        spec = spec.replace(data_options=run_data_options(train_config))
    spec = spec.replace(task=spec.task or train_config.get("data"), ranks=ranks,
                        quantization="none" if spec.engine else  # the engine serves the full-precision base
                        spec.quantization or train_config.get("quantization", "none"),
                        output_dir=spec.output_dir or default_eval_dir(run_dir, read_as, spec.score_only, spec.engine))
    if not spec.task:
        raise UserError(f"--task not given and {os.path.join(run_dir, TRAIN_CONFIG)} names no data; "
                        "give --task gsm8k, arithmetic, a JSONL file or lm-eval:<task>")
    settings = spec.settings(train_config.get("model_path") or train_config.get("model"),
                             file_digest(os.path.join(run_dir, WEIGHTS)), read_as)
    backend = engine_backend(spec) if spec.engine else backend_for(spec)
    return EvalPlan(spec, config, ranks, read_as, settings, backend)


def evaluate_run(run_dir: str, spec: EvalSpec | None = None, model_and_tokenizer=None, **options) -> dict:
    """Evaluate a run at rank 0 (the base model) and every requested rank; write eval.json, eval.md, the plot.

    Args:
        run_dir: a folder written by ``matryoshka-lora train`` (or ``svd``).
        spec: what to evaluate (``EvalSpec``); or its fields as keyword ``options``.
        model_and_tokenizer: an already loaded (model, tokenizer) of this run, to skip loading.

    Returns:
        The eval.json dict.

    Raises:
        UserError / AdapterFileError: bad run folder, adapter file, task, or options.
    """
    return run_plan(run_dir, plan_eval(run_dir, spec, **options), model_and_tokenizer)


def run_plan(run_dir: str, plan: EvalPlan, model_and_tokenizer=None) -> dict:
    """``evaluate_run`` of a checked plan: finished ranks are reused, the others computed and stored."""
    spec, backend, ranks, config = plan.spec, plan.backend, plan.ranks, plan.config
    hashes = {k: settings_hash(plan.settings, backend.items, with_adapter=k != PRETRAINED)
              for k in [PRETRAINED] + ranks}
    records = {k: r for k in hashes if (r := load_done(spec.output_dir, k, hashes[k])) is not None}
    pending = [k for k in [PRETRAINED] + ranks if k not in records]
    if records:
        done = ", ".join("pretrained" if k == PRETRAINED else str(k) for k in sorted(records))
        print(f"matryoshka-lora eval: reusing finished ranks {done} from {spec.output_dir}/ranks", flush=True)
    started = time.perf_counter()
    if pending and spec.engine:
        with engine_url(run_dir, spec, ranks) as url:
            _compute(backend.attach(url), None, run_tokenizer(run_dir), pending, spec.output_dir, hashes, records)
    elif pending:
        model, tokenizer = model_and_tokenizer or load_model(run_dir, spec)
        with read_as_rule(model, config):
            _compute(backend, model, tokenizer, pending, spec.output_dir, hashes, records)
    result = summarize(spec.task, backend.kind, ranks, records, plan.settings, config, run_dir, spec.stacked)
    result.update(inference=config.inference, output_dir=os.path.abspath(spec.output_dir))
    result["seconds_total"] = round(time.perf_counter() - started, 3)
    write_eval_outputs(result, spec.output_dir)
    return result


def _compute(backend, model, tokenizer, pending: list[int], output_dir: str, hashes: dict, records: dict) -> None:
    """Evaluate the pending ranks pass by pass, storing each record as soon as it is done."""
    for group in backend.groups(pending):
        for k, record in backend.run(model, tokenizer, group).items():
            save_record(output_dir, k, record, hashes[k])
            records[k] = record


def run_data_options(train_config: dict) -> dict | None:
    """The data keys of a run's config that differ from their defaults (a key the saved config lacks was added
    later: the run used its default), or None."""
    defaults = TrainConfig()
    options = {k: train_config[k] for k in DATA_KEYS if k in train_config and train_config[k] != getattr(defaults, k)}
    return options or None


def _read_as(config: MatryoshkaConfig, inference: str | None) -> tuple[str | None, MatryoshkaConfig]:
    """(the rule read under when it is not the run's own, else None; the config under that rule)."""
    try:
        read = config.read_as(inference)
    except ValueError as e:
        raise UserError(f"--inference {inference!r}: {e}") from None
    return (read.inference if read.inference != config.inference else None), read


def check_run(run_dir: str, ranks) -> tuple[MatryoshkaConfig, list[int]]:
    """(MatryoshkaConfig, ranks) after checking the run's files, before anything is loaded or written.

    Raises:
        UserError / AdapterFileError: missing folder or files, a truncated adapter, or ranks outside 1..R.
    """
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir!r} not found")
    read_train_config(run_dir)
    try:  # missing, truncated, non-finite or contradicting adapter files fail here, naming the file
        config = read_checked(run_dir)[0]
    except AdapterFileError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    ranks = sorted(set(config.train_ranks if ranks is None else ranks))
    bad = [k for k in ranks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.rank]
    if bad or not ranks:
        raise UserError(f"--ranks {bad or ranks} outside 1..{config.rank} (the run's maximum rank {config.rank})")
    return config, ranks


def load_model(run_dir: str, spec: EvalSpec):
    """The run's model and tokenizer (``base_models.load_run``) on the spec's device, with its attention kernel."""
    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_run(run_dir, dtype=spec.dtype, device=device, quantization=spec.quantization)
    if spec.attn_implementation:
        try:
            model.get_base_model().set_attn_implementation(spec.attn_implementation)
        except (ValueError, ImportError) as e:
            raise UserError(f"--attn_implementation {spec.attn_implementation!r} is not available: "
                            f"{str(e).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def read_as_rule(model, config):
    """Evaluate ``model`` under ``config``'s inference rule, then give it back its own config."""
    state = matryoshka_state(model)
    own, state.config = state.config, config
    try:
        yield model
    finally:
        state.config = own
