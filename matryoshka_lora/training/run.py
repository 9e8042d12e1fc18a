"""``train(config)``: one training run, as prepare (load everything, write nothing) / fit / finish.

Built on the Hugging Face Trainer, so bf16, gradient accumulation and checkpointing, report_to and multi-process
launch (``torchrun``/``accelerate launch -m matryoshka_lora train ...``; FSDP2 and DeepSpeed through the ``fsdp``
and ``deepspeed`` keys, see docs/distributed.md) behave as usual. The run folder is described in ``rundir.py``.
"""
import contextlib
import dataclasses
import importlib.util
import os
import resource
import signal
import time
from dataclasses import dataclass

import accelerate
import torch
from peft import prepare_model_for_kbit_training
from transformers import TrainingArguments, set_seed
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
from transformers.trainer_callback import ProgressCallback
from transformers.training_args import ParallelMode

from ..base_models import load_base_model, load_tokenizer, resolve_model
from ..data import load_examples
from ..features import Collator, PackedCollator, describe_counts, pack_features, packing_problem, tokenize_examples
from ..errors import TrainingStopped, UserError
from ..files import write_json, write_yaml
from ..methods import METHODS
from ..model import adapter_shapes, get_matryoshka_model
from ..rundir import (CHECKPOINTS, COMPLETE, TRAIN_CONFIG, check_disk, check_output_dir, latest_checkpoint,
                      save_final, start_run)
from ..svd import nest_in_place
from .budget import check_memory
from .config import TrainConfig, default_output_dir
from .init_adapter import load_init_adapter
from .sharding import FSDP1_REFUSED, sharding_args
from .trainer import BarCallback, MatryoshkaTrainer, RankCallback, SignalCallback


@dataclass
class Prepared:
    """A run that has loaded (config, model, data, Trainer) and written nothing yet."""

    run_dir: str
    checkpoint: str | None
    model_path: str
    tokenizer: object
    trainer: MatryoshkaTrainer
    signals: SignalCallback
    counts: dict
    is_main: bool


def train(config: TrainConfig, trainer_class: type = MatryoshkaTrainer) -> str:
    """Train an adapter as ``config`` says and return the run folder.

    Args:
        config: the run's config (validated here).
        trainer_class: ``MatryoshkaTrainer`` or a subclass of it.

    Raises:
        UserError: a bad config, data or model, or an output folder that holds a different run; nothing is
            written to ``output_dir`` before the config, the model and the data have all loaded.
        TrainingStopped: a signal, a diverged run or a failed final save (the run stays resumable).
    """
    config.validate()
    config.output_dir = config.output_dir or default_output_dir(config)
    started = time.perf_counter()
    run = prepare(config, trainer_class)
    if run.is_main:  # everything has loaded: only now touch the output folder
        start_run(run.run_dir, run.checkpoint, config.overwrite, config.resume)
        resolved = dict(config.to_dict(), model_path=run.model_path, resume=False, overwrite=False)
        write_yaml(os.path.join(run.run_dir, TRAIN_CONFIG), resolved)
    result = fit(run, config)
    finish(run, config, result, time.perf_counter() - started)
    return run.run_dir


def prepare(config: TrainConfig, trainer_class: type) -> Prepared:
    """Check the run folder, load the tokenizer, data and model and build the Trainer; nothing is written."""
    run_dir = os.path.abspath(config.output_dir)
    checkpoint = check_output_dir(config)
    mconfig = config.matryoshka_config()
    check_report_to(config.report_to)
    args = training_args(config, run_dir)  # checks bf16/fp16 support, optim, scheduler
    model_path = resolve_model(config.model, config.dtype)
    tokenizer = load_tokenizer(model_path)
    features, counts = _features(config, tokenizer)
    set_seed(config.seed)
    model = load_base_model(model_path, config.dtype, quantization=config.quantization)
    model.config.use_cache = False
    if config.quantization != "none":  # PEFT's k-bit preparation (norms and embeddings in fp32, input grads)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.packing and (problem := packing_problem(model)):
        raise UserError(problem)
    try:
        check_memory(adapter_shapes(model, mconfig), mconfig.rank, config.use_cpu)
        model = get_matryoshka_model(model, mconfig)
        if config.init_adapter:
            load_init_adapter(model, config.init_adapter)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_disk(run_dir, sum(p.numel() * 4 for p in model.parameters() if p.requires_grad), config)
    is_main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate launch set RANK
    signals = SignalCallback()
    created = [d for d in (run_dir, args.output_dir) if not os.path.exists(d)]
    trainer = trainer_class(  # its main process creates checkpoints/ (removed again if the sharding is refused)
        model=model, args=args, train_dataset=features,
        data_collator=(PackedCollator if config.packing else Collator)(tokenizer.pad_token_id), run_dir=run_dir,
        max_bad_steps=config.max_bad_steps,
        rank_callback=(rank_cb := RankCallback(config.seed)), callbacks=[rank_cb, signals])
    try:
        check_sharding(trainer, config)
    except UserError:
        for d in reversed(created if is_main else []):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty
        # every process refuses alike; none exits (and torchrun SIGTERMs the rest) before the main one cleaned up
        trainer.accelerator.wait_for_everyone()
        raise
    trainer.remove_callback(ProgressCallback)  # the Trainer's own bar, replaced by ours
    trainer.add_callback(BarCallback())
    return Prepared(run_dir, checkpoint, model_path, tokenizer, trainer, signals, counts, is_main)


def _features(config: TrainConfig, tokenizer) -> tuple[list[dict], dict]:
    examples = load_examples(config.data, config.data_split, config.max_examples, tokenizer, seed=config.seed,
                             data_format=config.data_format, data_columns=config.data_columns,
                             data_config=config.data_config)
    features, counts = tokenize_examples(examples, tokenizer, config.max_length)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"data {config.data}: {describe_counts(counts, config.max_length)}", flush=True)
    if not features:
        raise UserError(f"data {config.data}: no example left to train on (all {counts['examples']} dropped); "
                        f"raise max_length (now {config.max_length})")
    if config.packing:
        features, packed = pack_features(features, config.max_length)
        counts = dict(counts, blocks=packed["blocks"])
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"packing: {packed['examples']} examples in {packed['blocks']} rows of <= {config.max_length} "
                  f"tokens ({packed['fill']:.0%} filled)", flush=True)
    return features, counts


def fit(run: Prepared, config: TrainConfig):
    """Train, resuming from the run's checkpoint; a signal or divergence ends in ``TrainingStopped``."""
    if run.checkpoint and run.is_main:
        print(f"resuming from {run.checkpoint}", flush=True)
    run.signals.install()
    try:
        result = run.trainer.train(resume_from_checkpoint=run.checkpoint)
    finally:
        run.signals.uninstall()
    _stop_early(run.trainer, run.signals.signum, run.run_dir, config)
    return result


def finish(run: Prepared, config: TrainConfig, result, seconds: float) -> None:
    """Save the final adapter and tokenizer, then ``run_complete.json`` (last) and the summary."""
    trainer = run.trainer
    state_dict = trainer.gathered_state_dict()  # FSDP, ZeRO-3: every process takes part in the gather
    if not trainer.is_world_process_zero():
        return
    try:
        rewrite = nest_in_place if config.matryoshka_config().method_record.svd_at_end else None
        files = save_final(trainer.accelerator.unwrap_model(trainer.model), run.tokenizer, run.run_dir, state_dict,
                           rewrite)
    except OSError as e:
        raise TrainingStopped(f"could not write the final adapter to {run.run_dir}: {e}; the last checkpoint "
                              f"{latest_checkpoint(run.run_dir)} is intact", 1) from None
    session_tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    summary = {
        "method": config.method, "rank": config.rank, "train_ranks": config.matryoshka_config().train_ranks,
        "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "tokens": int(trainer.state.num_input_tokens_seen), "session_tokens": int(session_tokens),
        "seconds": round(seconds, 1), "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "peak_memory_gib": round(peak_memory_gib(), 2), "examples": run.counts, "files": files,
    }
    write_json(os.path.join(run.run_dir, COMPLETE), summary)
    print_summary(summary, run.run_dir)


def check_sharding(trainer, config: TrainConfig) -> None:
    """Refuse an FSDP the run cannot honour: asked for but not enabled (accelerate shards on accelerators only,
    not on CPU processes), or FSDP1 (from fsdp_config, or from an ``accelerate launch`` config file).

    Raises:
        UserError: on every process alike, before anything is written.
    """
    if config.fsdp and not trainer.is_fsdp_enabled:
        raise UserError(f"fsdp={config.fsdp!r}: accelerate {accelerate.__version__} did not shard the model on "
                        f"{trainer.args.device.type} (it runs FSDP on GPUs and other accelerators, not on CPU "
                        "processes); train on GPUs, or remove fsdp to train with DDP")
    if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:
        raise UserError(f"FSDP1 is not supported: {FSDP1_REFUSED}; use FSDP2 (fsdp_config version 2, or "
                        "fsdp_version: 2 in the accelerate config file)")


def _stop_early(trainer, signum, run_dir: str, config: TrainConfig) -> None:
    """Raise TrainingStopped (exit 130/143 for a signal, 1 for divergence); the run stays resumable."""
    resume = f"matryoshka-lora train --resume --output_dir {config.output_dir}"
    last = latest_checkpoint(run_dir)
    if trainer.diverged:
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before"
        raise TrainingStopped(
            f"stopped at step {trainer.state.global_step}: {trainer.max_bad_steps} optimizer steps in a row had a "
            f"non-finite loss or gradient ({trainer.skipped_steps} skipped in all); {kept}. Lower learning_rate "
            f"or check the data, then: {resume}", 1)
    if signum is not None:
        name = signal.Signals(signum).name
        raise TrainingStopped(f"stopped by {name} after step {trainer.state.global_step}; checkpoint {last}; "
                              f"continue with: {resume}", 128 + signum)


def training_args(config: TrainConfig, run_dir: str) -> TrainingArguments:
    """The Trainer's arguments, with transformers' own checks turned into one-line errors.

    Raises:
        UserError: deepspeed missing, a value transformers refuses, or fsdp without several processes.
    """
    if config.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"deepspeed={config.deepspeed!r} needs the deepspeed package (pip install deepspeed; it is "
                        "not a dependency of matryoshka-lora), or remove deepspeed to train with DDP or fsdp")
    try:
        args = _build_training_args(config, run_dir)
    except ValueError as e:  # transformers' own checks: scheduler, optim, bf16 on this hardware, FSDP options, ...
        raise UserError(f"invalid config: {str(e).splitlines()[0]}") from None
    if config.fsdp and args.parallel_mode != ParallelMode.DISTRIBUTED:  # the Trainer would refuse, with a traceback
        raise UserError(f"fsdp={config.fsdp!r} shards the model over several processes; start them with torchrun "
                        "--nproc_per_node N -m matryoshka_lora train ... or accelerate launch -m matryoshka_lora "
                        "train ... (see docs/distributed.md)")
    return args


def _build_training_args(config: TrainConfig, run_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=os.path.join(run_dir, CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=int(config.warmup_steps) if config.warmup_steps >= 1 else config.warmup_steps,
        weight_decay=config.weight_decay, optim=config.optim, max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no", save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        seed=config.seed, bf16=config.bf16, fp16=config.fp16, use_cpu=config.use_cpu,
        **_checkpointing_args(config.gradient_checkpointing),
        report_to=[r.strip() for r in config.report_to.split(",")] if config.report_to != "none" else "none",
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and not config.use_cpu,
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        **sharding_args(config),
    )


def check_report_to(report_to: str) -> None:
    """Raises: UserError for an unknown integration, or one whose package is not installed."""
    wanted = [r.strip() for r in report_to.split(",") if r.strip()]
    if wanted in ([], ["none"], ["all"]):
        return
    unknown = [r for r in wanted if r not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise UserError(f"report_to={report_to!r}: unknown {unknown}; choose none, all or any of "
                        f"{', '.join(INTEGRATION_TO_CALLBACK)}")
    missing = [r for r in wanted if r not in get_available_reporting_integrations()]
    if missing:
        raise UserError(f"report_to={report_to!r} needs {' and '.join(missing)} installed "
                        f"(pip install {' '.join(missing)}), or use --report_to none")


def _checkpointing_args(enabled: bool) -> dict:
    """Gradient checkpointing, non-reentrant: the frozen base gives the reentrant form no input grads."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    if not enabled:
        return {}
    return {prefix: True, f"{prefix}_kwargs": {"use_reentrant": False}}


def peak_memory_gib() -> float:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def print_summary(s: dict, run_dir: str) -> None:
    rel = os.path.relpath(run_dir) if not os.path.relpath(run_dir).startswith("..") else run_dir
    nested = "re-factored by SVD at the save: rank k is the best rank-k approximation of the trained ΔW\n" \
        if METHODS[s["method"]].svd_at_end else ""
    print(
        f"\ntrained {s['method']} R={s['rank']} (ranks {s['train_ranks']}): {s['steps']} steps in {s['seconds']:.0f} s, "
        f"{s['tokens']} tokens ({s['session_tokens'] / max(s['train_seconds'], 1e-9):.0f} tokens/s), mean train loss "
        f"{s['train_loss']:.4f}, peak memory {s['peak_memory_gib']:.2f} GiB\n"
        f"{nested}adapter, config, tokenizer and train_log.jsonl: {rel}/\n"
        f"next: matryoshka-lora eval {rel}    (accuracy at every rank)\n"
        f"      matryoshka-lora export {rel}  (standard PEFT adapters per rank)", flush=True)
