"""The run folder: every file name in it, and the rules for creating, continuing and finishing one.

    adapter_config.json, adapter_model.safetensors   the final adapter (PEFT format)
    matryoshka_config.json     the nested-rank settings (``MatryoshkaConfig``); loading requires it
    train_config.yaml          every key, resolved (``model`` as given, ``model_path`` the local folder used)
    tokenizer files            so the run folder is self-contained
    train_log.jsonl            one JSON object per logged step: step, loss, learning_rate, rank, tokens_per_s
    checkpoints/checkpoint-N/  Trainer checkpoints, continued exactly by ``--resume``
    run_complete.json          written last: a folder without it is an unfinished run
    eval*/                     evaluations (``eval.json``, ``eval.md``, ``rank_curve.png``, ``ranks/``)
    export/rank-K/             exported ranks
"""
import json
import os
import shutil
import sys
import tempfile
import warnings

from .errors import UserError
from .files import move_contents, read_yaml, write_text

WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MATRYOSHKA_CONFIG = "matryoshka_config.json"
TRAIN_CONFIG = "train_config.yaml"
LOG = "train_log.jsonl"
COMPLETE = "run_complete.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_DONE = "checkpoint_complete.json"  # written after the Trainer's files: --resume ignores unmarked ones
EVAL_JSON, EVAL_MD, RANK_CURVE, EVAL_RANKS = "eval.json", "eval.md", "rank_curve.png", "ranks"  # in eval*/
SVD_SOURCE = "svd_source.json"  # which LoRA adapter an SVD run was made from
ADAPTER_FILES = (WEIGHTS, ADAPTER_CONFIG, MATRYOSHKA_CONFIG)
# Keys that may change between an interrupted run and its --resume without changing what is trained.
RESUME_FREE = {"output_dir", "resume", "overwrite", "save_steps", "save_total_limit", "logging_steps", "report_to",
               "dataloader_num_workers", "gradient_checkpointing", "model_path", "max_steps", "num_train_epochs"}


def default_eval_dir(run_dir: str, inference: str | None = None, score_only: bool = False,
                     engine: str | None = None) -> str:
    """RUN_DIR/eval, or eval-<rule> / eval-<engine> / eval-score / eval-<rule>-<engine>-score: a reading under
    another rule, through a serving engine, or without generation never overwrites the run's own evaluation."""
    parts = ["eval"] + [p for p in (inference, engine) if p] + (["score"] if score_only else [])
    return os.path.join(run_dir, "-".join(parts))


def run_model_name(train_config: dict) -> str | None:
    """The base model a run names: its resolved folder while it exists (a GGUF cache may have been cleared), else
    the name the user gave."""
    path = train_config.get("model_path")
    return path if path and os.path.isdir(str(path)) else train_config.get("model")


def read_train_config(run_dir: str) -> dict:
    """The resolved training config a run wrote (``RUN_DIR/train_config.yaml``).

    Raises:
        UserError: the file is missing or unreadable.
    """
    path = os.path.join(run_dir, TRAIN_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: {run_dir} is not a matryoshka-lora training run")
    return read_yaml(path)


def check_output_dir(config) -> str | None:
    """Check ``output_dir`` before anything is loaded: empty or missing, or a run to replace or continue.

    Returns:
        The checkpoint to resume from, or None (a fresh run; with --overwrite the old one is removed later).

    Raises:
        UserError: the folder holds a different run (without --overwrite/--resume), is not a run, or its
            config differs from this one on --resume.
    """
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output_dir {out} is a file; choose a folder")
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    if not os.path.isfile(os.path.join(out, TRAIN_CONFIG)):
        raise UserError(f"output_dir {out} is not empty and holds no matryoshka-lora run; choose another "
                        "--output_dir (nothing is deleted here, even with --overwrite)")
    complete = os.path.isfile(os.path.join(out, COMPLETE))
    if config.overwrite:
        return None
    if not config.resume:
        state = "a finished run" if complete else "an unfinished run"
        raise UserError(f"output_dir {out} already holds {state}; use --overwrite to replace it, --resume to "
                        "continue it, or choose another --output_dir")
    saved = read_train_config(out)
    _check_same_run(out, saved, config.to_dict())
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        state = "is finished and" if complete else "is unfinished and"
        raise UserError(f"--resume: the run in {out} {state} has no complete checkpoint to continue from "
                        f"(save_steps={saved.get('save_steps')}); use --overwrite to train it again")
    return checkpoint


def _check_same_run(out: str, saved: dict, mine: dict) -> None:
    if "seed" in saved and saved["seed"] != mine["seed"]:
        print(f"warning: --resume with seed {mine['seed']} but the run in {out} used seed {saved['seed']}; the "
              "data order and RNG states come from its checkpoint, new DyLoRA/sandwich draws from the new seed, so "
              "the result will differ from an uninterrupted run", file=sys.stderr, flush=True)
    differ = sorted(k for k in mine if k not in RESUME_FREE | {"seed"} and k in saved and saved[k] != mine[k])
    if differ:
        shown = ", ".join(f"{k}: {saved[k]!r} there, {mine[k]!r} now" for k in differ[:4])
        raise UserError(f"--resume: output_dir {out} holds a different run ({shown}); resume with the same "
                        "config, or use --overwrite")


def writable_parent(run_dir: str, shown: str) -> str:
    """The nearest existing folder of ``run_dir``, after checking that it can be written.

    Raises:
        UserError: it is a file, or cannot be written.
    """
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"output_dir {shown}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output_dir {shown} cannot be written ({e.strerror}: {parent}); "
                        "choose another --output_dir") from None
    return parent


def check_disk(run_dir: str, adapter_bytes: int, config) -> None:
    """Fail before training when the output folder cannot be written or its disk cannot hold the checkpoints.

    Args:
        adapter_bytes: the trainable parameters' size in fp32.

    Raises:
        UserError: naming the folder, what is needed and what is free.
    """
    parent = writable_parent(run_dir, config.output_dir)
    # adapter + AdamW moments per checkpoint, kept checkpoints plus the final adapter, and room for the tokenizer
    kept = (config.save_total_limit or 10) if config.save_steps else 0
    needed = adapter_bytes * 3 * kept + adapter_bytes + (64 << 20)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise UserError(f"output_dir {config.output_dir}: {free >> 20} MiB free on its disk, the run needs about "
                        f"{needed >> 20} MiB (adapter, {kept} checkpoints with optimizer state, tokenizer); free "
                        "space, lower save_total_limit, or choose another --output_dir")


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint whose save finished (its marker written after the Trainer's files)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isfile(os.path.join(path, CHECKPOINT_DONE)):
            done.append((int(name[11:]), path))
    return max(done)[1] if done else None


def checkpoint_step(checkpoint: str) -> int:
    return int(os.path.basename(checkpoint).split("-")[1])


def trim_log(path: str, last_step: int) -> None:
    """Drop log lines after ``last_step`` (written after the checkpoint a resumed run restarts from)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= last_step:
                kept.append(ln)
        except json.JSONDecodeError:
            continue
    write_text(path, "".join(kept))


def start_run(run_dir: str, checkpoint: str | None, overwrite: bool, resume: bool) -> None:
    """Make ``run_dir`` a run in progress: replaced (overwrite), its log cut back to the checkpoint (resume) or
    cleared, and its completion mark removed."""
    if overwrite and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, LOG)
    if checkpoint is not None:
        trim_log(log, checkpoint_step(checkpoint))
    elif os.path.isfile(log) and not resume:
        os.remove(log)
    if os.path.isfile(os.path.join(run_dir, COMPLETE)):
        os.remove(os.path.join(run_dir, COMPLETE))


def save_final(model, tokenizer, run_dir: str, state_dict: dict | None = None, rewrite=None) -> list[str]:
    """Write the adapter and tokenizer into a temp folder in ``run_dir``, then move each file to the top.

    ``state_dict``: the gathered weights when the processes hold shards (FSDP, ZeRO-3); None reads the model's.
    ``rewrite``: called with the temp folder once the adapter is in it, to replace it (``svd.nest_in_place``)
    before anything reaches ``run_dir``.
    """
    tmp = tempfile.mkdtemp(prefix=".final-tmp-", dir=run_dir)
    try:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        if rewrite is not None:
            rewrite(tmp)
        tokenizer.save_pretrained(tmp)
        moved = move_contents(tmp, run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted({rel.split(os.sep)[0] for rel in moved})


def warn_if_not_nested(config, directory) -> None:
    """A ``lora-svd`` adapter is nested by the SVD of ``train``'s final save (which writes ``svd_source.json``);
    its checkpoints hold the plain LoRA adapter that resumes, whose prefixes are truncations by position."""
    if not isinstance(directory, (str, os.PathLike)):
        return  # a model in memory: its adapter is what trained
    if config.method_record.svd_at_end and not os.path.isfile(os.path.join(directory, SVD_SOURCE)):
        warnings.warn(f"{directory} holds the plain LoRA adapter of a lora-svd run (a checkpoint, or a run that did "
                      f"not finish): its rank-k prefixes are not nested yet; `matryoshka-lora svd {directory}` "
                      "nests it", stacklevel=3)
