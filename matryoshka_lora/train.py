"""`matryoshka-lora train CONFIG.yaml [--key value ...]`: fine-tune a causal LM with a nested-rank LoRA adapter.

Built on the Hugging Face Trainer, so bf16, gradient accumulation and checkpointing, report_to and
multi-process launch (``torchrun``/``accelerate launch -m matryoshka_lora train ...``; FSDP2 and DeepSpeed
through the ``fsdp`` and ``deepspeed`` keys, see docs/distributed.md) behave as usual.

Run folder:
    adapter_config.json, adapter_model.safetensors, matryoshka_config.json   the final adapter (PEFT format)
    train_config.yaml          every key, resolved (``model`` as given, ``model_path`` the local folder used)
    tokenizer files            so the run folder is self-contained
    train_log.jsonl            one JSON object per logged step: step, loss, learning_rate, rank, tokens_per_s
    checkpoints/checkpoint-N/  Trainer checkpoints, continued exactly by ``--resume``
    run_complete.json          written last: a folder without it is an unfinished run
"""
import argparse
import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

from .errors import ArgumentParser, TrainingStopped, UserError
from .files import write_json, write_text, write_yaml

TRAIN_CONFIG_NAME = "train_config.yaml"
LOG_NAME = "train_log.jsonl"
COMPLETE_NAME = "run_complete.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_DONE = "checkpoint_complete.json"
# Keys that may change between an interrupted run and its --resume without changing what is trained.
RESUME_FREE = {"output_dir", "resume", "overwrite", "save_steps", "save_total_limit", "logging_steps", "report_to",
               "dataloader_num_workers", "gradient_checkpointing", "model_path", "max_steps", "num_train_epochs"}


def key(default, help: str, kind: str):
    """A config key: its default, its meaning (shown by --help) and its kind (for coercion)."""
    meta = {"help": help, "kind": kind}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run needs; every key can be set in the YAML file or as ``--key value``."""

    # what to train
    model: str = key("smollm2", "hub id, local folder, .gguf file, or 'smollm2' (the embedded "
                     "SmolLM2-135M-Instruct)", "str")
    data: str = key("arithmetic", "arithmetic (built-in, offline), gsm8k, platypus, a .jsonl file (question/answer, "
                    "instruction/input/output, prompt/completion or messages) or a folder with train.jsonl", "str")
    max_examples: int | None = key(None, "use the first N training examples (arithmetic: generate N; "
                                   "default 2000)", "int?")
    max_length: int = key(256, "tokens per example; longer examples are truncated (and counted)", "int")
    # the adapter
    method: str = key("dylora", "dylora (the default: one sampled rank per optimizer step; best at equal compute "
                      "in docs/results.md), matryoshka (the paper: all nested ranks at once through P), lora, matryoshka-exact (the multi-rank loss itself, the "
                      "batch stacked across the train ranks) or sandwich (loss at R, the smallest rank and "
                      "sandwich_n sampled ranks, stacked)", "str")
    rank: int = key(8, "maximum rank R of the adapter", "int")
    train_ranks: list[int] | None = key(None, "nested ranks S trained together, e.g. 1,2,4,8 (default: powers "
                                        "of two up to R, and R)", "ranks")
    scaling: str = key("none", "adapter scale s_r: none (1, the paper's choice), rank (1/r) or sqrt (1/sqrt r)",
                       "str")
    target_modules: str | list[str] = key("all-linear", "modules to adapt: names (q_proj,v_proj), a regex, or "
                                          "all-linear", "modules")
    lora_dropout: float = key(0.0, "dropout on the adapter input", "float")
    init: str = key("peft", "init of A: peft (kaiming-uniform, bound 1/sqrt(in)) or paper (bound 1/sqrt(R))", "str")
    dylora_ranks: str = key("train", "ranks DyLoRA samples from: train (the train ranks) or all (1..R)", "str")
    lora_kwargs: dict = key({}, "further peft.LoraConfig fields, e.g. {layers_to_transform: [0, 1]}", "dict")
    p_normalize: bool = key(False, "weights λ_r = 1/|S| (Appendix B) instead of Algorithm 1's λ_r = 1", "bool")
    weights: list[float] | None = key(None, "λ_r per train rank, e.g. 0.4,0.3,0.2,0.1 (default: see p_normalize)",
                                      "floats?")
    inference: str = key("paper", "what rank k means: paper (s_k·A_k B_k) or prefix (the trained function "
                         "truncated to k, so rank R is the training forward; matryoshka and lora only)", "str")
    sandwich_n: int = key(2, "sandwich: ranks sampled between the smallest and the largest each step", "int")
    # optimisation
    learning_rate: float = key(1e-3, "peak learning rate of AdamW", "float")
    lr_scheduler_type: str = key("linear", "learning-rate schedule (Trainer names: linear, cosine, constant, "
                                 "constant_with_warmup, ...)", "str")
    warmup_steps: float = key(0.05, "warmup: a number of steps, or a fraction of all steps when < 1", "float")
    weight_decay: float = key(0.0, "AdamW weight decay", "float")
    optim: str = key("adamw_torch", "optimizer (Trainer names)", "str")
    max_grad_norm: float = key(1.0, "gradient clipping norm (0: off)", "float")
    batch_size: int = key(8, "examples per device per micro-batch", "int")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", "int")
    num_train_epochs: float = key(1.0, "passes over the data (when max_steps is -1)", "float")
    max_steps: int = key(150, "optimizer steps; -1 to use num_train_epochs", "int")
    seed: int = key(0, "seed of the adapter init, data order and DyLoRA rank draws", "int")
    # precision and memory
    dtype: str = key("float32", "dtype the base model is loaded in: float32, bfloat16, float16 or auto", "str")
    bf16: bool = key(False, "bf16 mixed precision (GPU)", "bool")
    fp16: bool = key(False, "fp16 mixed precision (GPU)", "bool")
    gradient_checkpointing: bool = key(False, "recompute activations to save memory (non-reentrant)", "bool")
    use_cpu: bool = key(False, "train on the CPU even when a GPU is present", "bool")
    dataloader_num_workers: int = key(0, "data loader worker processes", "int")
    # several processes (torchrun / accelerate launch; see docs/distributed.md)
    fsdp: str = key("", "shard the model over the processes with FSDP2: true (tuned by fsdp_config), or options "
                    "among full_shard, shard_grad_op, offload, auto_wrap; false: off (DDP)", "fsdp")
    fsdp_config: dict | str | None = key(None, "FSDP settings (the Trainer's fsdp_config): a mapping such as "
                                         "{version: 2, cpu_offload: true} or a JSON file", "json?")
    deepspeed: dict | str | None = key(None, "DeepSpeed config: a JSON file or a mapping (ZeRO-3 needs "
                                       "stage3_gather_16bit_weights_on_model_save: true); needs pip install "
                                       "deepspeed", "json?")
    # output
    output_dir: str | None = key(None, "run folder (default: runs/<config name>, or runs/<data>-<method>-r<rank>)",
                                 "str?")
    logging_steps: int = key(10, "log loss, learning rate, rank and tokens/s every N steps", "int")
    save_steps: int = key(100, "write a resumable checkpoint every N steps (0: only the final adapter)", "int")
    max_bad_steps: int = key(5, "stop after N consecutive optimizer steps with a non-finite loss or gradient "
                             "(each such step is skipped and counted)", "int")
    save_total_limit: int | None = key(2, "keep at most N checkpoints (none: keep all)", "int?")
    report_to: str = key("none", "where else to log: none, tensorboard, wandb, all (comma-separated)", "str")
    overwrite: bool = key(False, "replace a run already in output_dir", "bool")
    resume: bool = key(False, "continue the run in output_dir from its latest checkpoint", "bool")

    def _matryoshka_values(self) -> dict:
        from .config import MatryoshkaConfig

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(MatryoshkaConfig)}
        values["lora_kwargs"] = dict(values["lora_kwargs"])
        return values

    def matryoshka_config(self):
        from .config import MatryoshkaConfig

        return MatryoshkaConfig(**self._matryoshka_values())

    def problems(self) -> list[str]:
        """Every problem with the values (types are checked when the config is built)."""
        from .config import MatryoshkaConfig
        from .models import DTYPES

        out = []
        try:
            m = MatryoshkaConfig.__new__(MatryoshkaConfig)
            m.__dict__.update(self._matryoshka_values())
            out += m.problems()
        except Exception as e:  # a type the checks did not expect
            out.append(str(e))
        positive = ("max_length", "batch_size", "gradient_accumulation_steps", "logging_steps", "max_bad_steps")
        out += [f"{k}={getattr(self, k)!r} is not valid; give an integer >= 1" for k in positive
                if getattr(self, k) < 1]
        if self.max_length == 1:
            out.append("max_length=1 leaves no room for an answer; give at least 2")
        if self.max_examples is not None and self.max_examples < 1:
            out.append(f"max_examples={self.max_examples!r} is not valid; give an integer >= 1 or none for all")
        if not self.learning_rate > 0:
            out.append(f"learning_rate={self.learning_rate!r} is not valid; give a number > 0")
        if self.max_steps == 0 or self.max_steps < -1:
            out.append(f"max_steps={self.max_steps!r} is not valid; give a number of steps >= 1, or -1 for epochs")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            out.append(f"num_train_epochs={self.num_train_epochs!r} is not valid; give a number > 0")
        if self.save_steps < 0:
            out.append(f"save_steps={self.save_steps!r} is not valid; give 0 (no checkpoints) or a number of steps")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            out.append(f"save_total_limit={self.save_total_limit!r} is not valid; give an integer >= 1 or none")
        for k in ("warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers"):
            if getattr(self, k) < 0:
                out.append(f"{k}={getattr(self, k)!r} is not valid; give a number >= 0")
        if self.dtype not in DTYPES:
            out.append(f"dtype={self.dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
        if self.bf16 and self.fp16:
            out.append("bf16 and fp16 are both set; choose one")
        if self.overwrite and self.resume:
            out.append("overwrite and resume are both set; choose one")
        if not self.model:
            out.append("model is empty; give a hub id, a local folder, a .gguf file or smollm2")
        if not self.data:
            out.append("data is empty; give arithmetic, gsm8k, platypus, a .jsonl file or a folder")
        return out + sharding_problems(self)

    def validate(self) -> None:
        """Coerce every value to its kind (a config built in Python may hold strings) and check them all.

        Raises:
            UserError: listing every problem at once.
        """
        problems = []
        for name in FIELDS:
            value, problem = coerce(name, getattr(self, name))
            if problem:
                problems.append(problem)
            else:
                setattr(self, name, value)
        problems = problems or self.problems()
        if problems:
            raise UserError("invalid config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------- FSDP and DeepSpeed settings

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")  # those FSDP2 takes (FSDP1 is refused)
# The fsdp_config keys transformers reads for FSDP2 (TrainingArguments._process_fsdp_args), each also as
# fsdp_<key>; the FSDP1-only ones (use_orig_params, backward_prefetch, ...) would be ignored, so they are errors.
FSDP_CONFIG_KEYS = ("version", "reshard_after_forward", "cpu_offload", "activation_checkpointing",
                    "cpu_ram_efficient_loading", "state_dict_type", "auto_wrap_policy", "transformer_layer_cls_to_wrap",
                    "min_num_params")
FSDP1_REFUSED = ("FSDP1 wraps every lora_A and lora_B in its own FSDP module (PEFT's auto-wrap policy), so PEFT's "
                 "forward misses the rank gates that set_rank and DyLoRA write, and the fused branch reads their "
                 "still-sharded weights; transformers deprecates FSDP1")


def json_setting(name: str, value) -> tuple[dict | None, str | None]:
    """The mapping of ``fsdp_config`` or ``deepspeed``: given inline, or read from a JSON file.

    Returns:
        (mapping or None, problem or None); the problem names the key, the value and what is valid.
    """
    if value is None or isinstance(value, dict):
        return value, None
    bad = f"{name}={value!r} is not valid; "
    if not os.path.isfile(value):
        return None, bad + "the file does not exist; give a JSON file or a mapping"
    try:
        with open(value) as f:
            loaded = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, bad + f"not a readable JSON file ({e}); give a JSON file or a mapping"
    if not isinstance(loaded, dict):
        return None, bad + f"the file holds a {type(loaded).__name__}, not a JSON object of settings"
    return loaded, None


def sharding_problems(config) -> list[str]:
    """Problems with fsdp, fsdp_config and deepspeed (files are read here, so a typo fails before loading)."""
    out = []
    if config.fsdp and config.fsdp != "true":
        unknown = [o for o in config.fsdp.split() if o not in FSDP_OPTIONS]
        if unknown:
            out.append(f"fsdp={config.fsdp!r} is not valid ({', '.join(map(repr, unknown))} unknown); give true, "
                       f"false, or options among {', '.join(FSDP_OPTIONS)}, e.g. 'full_shard auto_wrap'")
    fsdp_config, problem = json_setting("fsdp_config", config.fsdp_config)
    out += [problem] if problem else []
    if fsdp_config is not None:
        names = {str(k)[5:] if str(k).startswith("fsdp_") else str(k): v for k, v in fsdp_config.items()}
        unknown = [k for k in names if k not in FSDP_CONFIG_KEYS]
        if unknown:
            out.append(f"fsdp_config key(s) {', '.join(map(repr, unknown))} not valid; the keys are "
                       f"{', '.join(FSDP_CONFIG_KEYS)}")
        if str(names.get("version", 2)) != "2":
            out.append(f"fsdp_config version={names['version']!r} is not valid; give 2 (FSDP2, the default): "
                       f"{FSDP1_REFUSED}")
        if not config.fsdp:
            out.append("fsdp_config is set but fsdp is off; set fsdp: true, or remove fsdp_config")
    ds_config, problem = json_setting("deepspeed", config.deepspeed)
    out += [problem] if problem else []
    if ds_config is not None:
        zero = ds_config.get("zero_optimization") or {}
        if isinstance(zero, dict) and str(zero.get("stage")) == "3" \
                and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
            out.append(f"deepspeed={config.deepspeed!r}: ZeRO-3 needs zero_optimization."
                       "stage3_gather_16bit_weights_on_model_save: true, or the saved adapter would be empty shards")
    if config.fsdp and config.deepspeed is not None:
        out.append("fsdp and deepspeed are both set; choose one")
    return out


# ---------------------------------------------------------------- reading configs: YAML + command line

def coerce(name: str, value, from_cli: bool = False):
    """``value`` as the kind of key ``name``; CLI strings are parsed (YAML scalars, comma lists).

    Returns:
        (value, problem): problem is None, or a message naming the key, the value and what is valid.
    """
    import yaml

    kind = FIELDS[name].metadata["kind"]
    raw = value
    if from_cli and isinstance(value, str) and kind not in ("str", "modules"):
        if kind == "ranks" and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        else:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
    if from_cli and kind == "modules" and isinstance(value, str) and "," in value:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if kind in ("str?", "int?") and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None, None
    bad = f"{name}={raw!r} is not valid; "
    if kind in ("str", "str?"):
        return (str(value), None) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else \
            (None, bad + "give a string")
    if kind in ("int", "int?"):
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                return None, bad + "give an integer"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else \
            (None, bad + "give an integer")
    if kind == "float":
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                value = float(value.strip())
            except ValueError:
                return None, bad + "give a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, bad + "give a number"
        return float(value), None
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            value = value.lower() in ("true", "yes", "1")
        return (value, None) if isinstance(value, bool) else (None, bad + "give true or false")
    if kind == "floats?":
        if from_cli and isinstance(raw, str) and "," in raw:
            value = [v.strip() for v in raw.split(",") if v.strip()]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "default")):
            return None, None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        try:
            return [float(v) for v in value if not isinstance(v, bool)], None
        except (TypeError, ValueError):
            return None, bad + "give a list of numbers such as 0.4,0.3,0.2,0.1"
    if kind == "ranks":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "default")):
            return None, None
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            return None, bad + "give a list of integers such as 1,2,4,8"
        out = []
        for v in value:
            try:
                out.append(int(v) if not isinstance(v, bool) and float(v) == int(float(v)) else None)
            except (TypeError, ValueError):
                out.append(None)
        if None in out:
            return None, bad + "give a list of integers such as 1,2,4,8"
        return out, None
    if kind == "modules":
        if isinstance(value, str) and value:
            return value, None
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value, None
        return None, bad + "give module names (q_proj,v_proj), a regex or all-linear"
    if kind == "fsdp":  # true/false, or Trainer FSDP options ("full_shard auto_wrap")
        if value is None or value is False:
            return "", None
        if value is True:
            return "true", None
        if not isinstance(value, str):
            return None, bad + "give true, false or FSDP options such as 'full_shard auto_wrap'"
        words = value.replace(",", " ").lower().split()
        if words in ([], ["false"], ["no"], ["off"], ["none"], ["0"]):
            return "", None
        return ("true" if words in (["true"], ["yes"], ["on"], ["1"]) else " ".join(words)), None
    if kind == "json?":  # a mapping, or the path of a JSON file (checked by sharding_problems)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None, None
        if isinstance(value, dict):
            return dict(value), None
        if isinstance(value, str):
            return value, None
        return None, bad + "give a mapping or the path of a JSON file"
    if kind == "dict":
        if from_cli and isinstance(value, str):
            return None, bad + "give a mapping such as {layers_to_transform: [0, 1]}"
        return (dict(value), None) if isinstance(value, dict) else (None, bad + "give a mapping")
    raise AssertionError(kind)


def unknown_key_problem(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see matryoshka-lora train --help for the keys"
    return f"unknown config key {name!r}{hint}"


def read_yaml(path: str) -> dict:
    """The mapping in a YAML config file. Raises: UserError (missing file, bad YAML, not a mapping)."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"{path} must hold a mapping of config keys (key: value), got {type(d).__name__}")
    return d


def build_config(file_values: dict, cli_values: dict, source: str = "config") -> TrainConfig:
    """A validated TrainConfig from YAML values and command-line overrides (which win).

    Raises:
        UserError: every unknown key, badly typed value and invalid value, in one message.
    """
    problems, values = [], {}
    for values_in, from_cli in ((file_values, False), (cli_values, True)):
        for name, value in values_in.items():
            if name not in FIELDS:
                problems.append(unknown_key_problem(str(name)))
                continue
            v, problem = coerce(name, value, from_cli)
            if problem:
                problems.append(problem)
            else:
                values[name] = v
    if problems:
        raise UserError(f"invalid {source}: " + "; ".join(problems))
    config = TrainConfig(**values)
    problems = config.problems()
    if problems:
        raise UserError(f"invalid {source}: " + "; ".join(problems))
    return config


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="matryoshka-lora train",
        description="Fine-tune a causal LM with a nested-rank LoRA adapter (matryoshka, dylora or lora). "
                    "Values come from CONFIG.yaml, then from --key value overrides.",
        epilog="example: matryoshka-lora train configs/smollm2-arithmetic.yaml --rank 16 --max_steps 50",
        formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True, allow_abbrev=False)
    p.add_argument("config", nargs="?", help="YAML file of config keys (optional: defaults train the embedded "
                   "SmolLM2 on arithmetic)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "none" if default is None else default
        kind = f.metadata["kind"]
        if kind in ("bool", "fsdp"):  # --flag alone means true
            p.add_argument(f"--{f.name}", nargs="?", const="true", default=argparse.SUPPRESS,
                           metavar="BOOL" if kind == "bool" else "BOOL|OPTIONS",
                           help=f"{f.metadata['help']} (default: {str(shown).lower() or 'false'})")
        else:
            p.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=kind.rstrip("?").upper(),
                           help=f"{f.metadata['help']} (default: {shown})")
    return p


def parse_args(argv) -> TrainConfig:
    """The config of a command line. Raises: UserError for every problem (unknown options included)."""
    p = parser()
    args, unknown = p.parse_known_args(argv)
    problems = []
    for i, token in enumerate(unknown):
        if token.startswith("--"):
            problems.append(unknown_key_problem(token[2:].split("=", 1)[0]))
        elif i > 0 and unknown[i - 1].startswith("--") and "=" not in unknown[i - 1]:
            continue  # the value of the unknown key just reported
        elif token.startswith("-"):
            problems.append(f"unknown option {token!r}")
        else:
            problems.append(f"unexpected argument {token!r} (one CONFIG.yaml at most; values follow their --key)")
    if problems:
        raise UserError("; ".join(problems))
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    file_values = {}
    if args.config:
        file_values = read_yaml(args.config)
    elif cli.get("resume") not in (None, "false", "no", "0") and cli.get("output_dir"):
        saved = os.path.join(cli["output_dir"], TRAIN_CONFIG_NAME)
        if os.path.isfile(saved):  # --resume --output_dir RUN alone continues that run as it was
            file_values = {k: v for k, v in read_yaml(saved).items() if k != "model_path"}
    config = build_config(file_values, cli, source=args.config or "command line")
    if config.output_dir is None:
        stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else \
            f"{os.path.splitext(os.path.basename(config.data.rstrip('/')))[0]}-{config.method}-r{config.rank}"
        config.output_dir = os.path.join("runs", stem)
    return config


def main(argv=None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    train(config)
    return 0


# ---------------------------------------------------------------- the run folder

def check_output_dir(config: TrainConfig) -> str | None:
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
    saved_path = os.path.join(out, TRAIN_CONFIG_NAME)
    is_run = os.path.isfile(saved_path)
    if not is_run:
        raise UserError(f"output_dir {out} is not empty and holds no matryoshka-lora run; choose another "
                        "--output_dir (nothing is deleted here, even with --overwrite)")
    complete = os.path.isfile(os.path.join(out, COMPLETE_NAME))
    if config.overwrite:
        return None
    if not config.resume:
        state = "a finished run" if complete else "an unfinished run"
        raise UserError(f"output_dir {out} already holds {state}; use --overwrite to replace it, --resume to "
                        "continue it, or choose another --output_dir")
    from .models import read_train_config

    saved = read_train_config(out)
    mine = config.to_dict()
    if "seed" in saved and saved["seed"] != mine["seed"]:
        print(f"warning: --resume with seed {mine['seed']} but the run in {out} used seed {saved['seed']}; the "
              "data order and RNG states come from its checkpoint, new DyLoRA/sandwich draws from the new seed, so "
              "the result will differ from an uninterrupted run", file=sys.stderr, flush=True)
    differ = sorted(k for k in mine if k not in RESUME_FREE | {"seed"} and k in saved and saved[k] != mine[k])
    if differ:
        shown = ", ".join(f"{k}: {saved[k]!r} there, {mine[k]!r} now" for k in differ[:4])
        raise UserError(f"--resume: output_dir {out} holds a different run ({shown}); resume with the same "
                        "config, or use --overwrite")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        state = "is finished and" if complete else "is unfinished and"
        raise UserError(f"--resume: the run in {out} {state} has no complete checkpoint to continue from "
                        f"(save_steps={saved.get('save_steps')}); use --overwrite to train it again")
    return checkpoint


def check_disk(run_dir: str, model, config: TrainConfig) -> None:
    """Fail before training when the output folder cannot be written or its disk cannot hold the checkpoints.

    Raises:
        UserError: naming the folder, what is needed and what is free.
    """
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"output_dir {config.output_dir}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output_dir {config.output_dir} cannot be written ({e.strerror}: {parent}); "
                        "choose another --output_dir") from None
    # adapter + AdamW moments per checkpoint, kept checkpoints plus the final adapter, and room for the tokenizer
    adapter_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
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


def save_final(model, tokenizer, run_dir: str, state_dict: dict | None = None) -> list[str]:
    """Write the adapter and tokenizer into a temp folder in ``run_dir``, then move each file to the top.

    ``state_dict``: the gathered weights when the processes hold shards (FSDP, ZeRO-3); None reads the model's.
    """
    tmp = tempfile.mkdtemp(prefix=".final-tmp-", dir=run_dir)
    try:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(run_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


# ---------------------------------------------------------------- training

def _trainer_classes():
    """Trainer subclass and callbacks, built lazily so `--help` and config errors do not import torch."""
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    from .config import STACKED_METHODS
    from .model import matryoshka_state, sample_rank
    from .objectives import multi_rank_loss

    class RankCallback(TrainerCallback):
        """DyLoRA: one rank per optimizer step from a seeded generator; replays past draws on resume."""

        def __init__(self, seed: int):
            self.generator = torch.Generator().manual_seed(seed)
            self.drawn = 0
            self.rank = None
            self.ranks = []  # drawn since the last log

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            while self.drawn < state.global_step:  # a resumed run: same draws as the uninterrupted one
                sample_rank(model, self.generator)
                self.drawn += 1
            self.rank = sample_rank(model, self.generator)
            self.drawn += 1
            if self.rank is not None:
                self.ranks.append(self.rank)

    class BarCallback(ProgressCallback):
        """The Trainer's progress bar, with loss, tokens/s and rank on the bar instead of printed dicts."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            if "loss" in logs:
                post = {"loss": f"{logs['loss']:.4f}", "tok/s": f"{logs.get('tokens_per_s', 0):.0f}"}
                if "rank" in logs:
                    post["rank"] = logs["rank"]
                self.training_bar.set_postfix(post, refresh=True)

    class MatryoshkaTrainer(Trainer):
        """The Trainer, adding rank and tokens/s to every log and writing train_log.jsonl."""

        def __init__(self, *args, run_dir=None, rank_callback=None, max_bad_steps=5, **kwargs):
            super().__init__(*args, **kwargs)
            self.run_dir = run_dir
            self.rank_callback = rank_callback
            self._last_log = None  # (time, tokens seen) at the previous log
            self.max_bad_steps = max_bad_steps
            self.bad_in_step = False  # a non-finite loss or gradient since the last optimizer step
            self.skipped_steps = 0
            self.bad_streak = 0
            self.diverged = False

        def create_optimizer(self, *args, **kwargs):
            """Wrap ``step`` so that an optimizer step with a non-finite loss or gradient is skipped."""
            optimizer = super().create_optimizer(*args, **kwargs)
            step = optimizer.step

            def guarded_step(*a, **k):
                bad = self.bad_in_step or any(p.grad is not None and not torch.isfinite(_local(p.grad)).all()
                                              for group in optimizer.param_groups for p in group["params"])
                self.bad_in_step = False
                if self.args.world_size > 1:  # FSDP shards gradients, and a loss is per process: every process
                    flag = torch.tensor([float(bad)], device=self.args.device)  # must skip the same steps
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    bad = bool(flag.item())
                if not bad:
                    self.bad_streak = 0
                    return step(*a, **k)
                optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                self.bad_streak += 1
                print(f"\nstep {self.state.global_step + 1}: non-finite loss or gradient, step skipped "
                      f"({self.bad_streak} in a row, {self.skipped_steps} in all)", flush=True)
                if self.bad_streak >= self.max_bad_steps:
                    self.diverged = True
                    self.control.should_training_stop = True
                return None

            optimizer.step = guarded_step
            return optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Stacked methods: the multi-rank loss in one pass; the others: the model's own loss."""
            if matryoshka_state(model).config.method not in STACKED_METHODS:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = multi_rank_loss(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                                   num_items_in_batch=num_items_in_batch if self.model_accepts_loss_kwargs else None)
            return (loss, None) if return_outputs else loss

        def training_step(self, *args, **kwargs):
            if self._last_log is None:  # first step of this session (after a resume, the restored count)
                self._last_log = (time.perf_counter(), self.state.num_input_tokens_seen)
            loss = super().training_step(*args, **kwargs)
            if not torch.isfinite(loss).all():
                self.bad_in_step = True
                loss = torch.zeros_like(loss)  # keep the logged mean finite; the step is skipped
            return loss

        def gathered_state_dict(self):
            """The adapter's full tensors where processes hold shards of it (FSDP, ZeRO-3), else None.

            A collective under FSDP and ZeRO-3: every process must call it; the main process gets the tensors.
            FSDP2 gathers the trainable parameters only, not the frozen base.
            """
            if self.is_fsdp_enabled:  # FSDP2 (check_sharding refuses FSDP1): parameters are DTensor shards
                return {name: _full(p).detach().cpu() for name, p in self.model.named_parameters()
                        if p.requires_grad}
            if self.is_deepspeed_enabled and \
                    self.accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
                try:
                    return self.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
                except TypeError:  # an older deepspeed: the whole model
                    return self.accelerator.get_state_dict(self.model_wrapped)
            return None

        def save_model(self, output_dir=None, _internal_call=False):
            """FSDP: gather the adapter alone, whatever state_dict_type (the Trainer's save gathers the whole
            model, or writes no adapter at all with SHARDED_STATE_DICT)."""
            if not self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call)
            self._save(output_dir or self.args.output_dir, state_dict=self.gathered_state_dict())

        def _save_checkpoint(self, model, trial):
            if self.diverged or self.bad_streak:  # only good steps get checkpoints: save_total_limit must never
                return                               # rotate the last good one out for a bad one
            try:
                super()._save_checkpoint(model, trial)
            except OSError as e:  # disk full, folder gone: the unmarked partial checkpoint is never resumed from
                kept = latest_checkpoint(os.path.dirname(self.args.output_dir))
                raise TrainingStopped(f"could not write the checkpoint of step {self.state.global_step}: {e}; "
                                      f"the previous checkpoint {kept} is intact", 1) from None
            if self.args.should_save:  # marks the checkpoint complete: --resume ignores unmarked ones
                folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
                write_json(os.path.join(folder, CHECKPOINT_DONE), {"step": self.state.global_step})

        def log(self, logs, start_time=None):
            if "loss" in logs and self._last_log is not None:
                now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
                then, before = self._last_log
                logs["tokens_per_s"] = round((tokens - before) / max(now - then, 1e-9), 1)
                self._last_log = (now, tokens)
                cb = self.rank_callback
                if cb is not None and cb.rank is not None:
                    logs["rank"] = cb.rank
                if self.is_world_process_zero():
                    entry = {"step": self.state.global_step, "epoch": round(self.state.epoch or 0, 4),
                             "loss": logs["loss"], "learning_rate": logs.get("learning_rate"),
                             "grad_norm": logs.get("grad_norm"), "rank": cb.rank if cb else None,
                             "ranks": list(cb.ranks) if cb else [], "tokens_per_s": logs["tokens_per_s"],
                             "tokens": tokens}
                    with open(os.path.join(self.run_dir, LOG_NAME), "a") as f:
                        f.write(json.dumps(_plain(entry)) + "\n")
                if cb is not None:
                    cb.ranks = []
            super().log(logs, start_time)

    class SignalCallback(TrainerCallback):
        """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop. Second: exit at once."""

        def __init__(self):
            self.signum = None

        def install(self):
            import signal

            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

        def uninstall(self):
            import signal

            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

        def handle(self, signum, frame):
            if self.signum is not None:
                os._exit(128 + signum)
            self.signum = signum
            print("\nstopping: finishing this step and saving a checkpoint (signal again to exit at once)",
                  file=sys.stderr, flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.signum is not None:
                control.should_save = True
                control.should_training_stop = True

    return MatryoshkaTrainer, RankCallback, BarCallback, ProgressCallback, SignalCallback


def _local(t):
    """This process's part of a tensor that FSDP2 shards (a DTensor); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t):
    """The whole of a tensor that FSDP2 shards (a collective: every process calls it in the same order)."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.device.type != t.device_mesh.device_type:  # cpu_offload: CPU shards of an accelerator mesh
        t = t.to(t.device_mesh.device_type)
    return t.full_tensor()


def _plain(d: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def train(config: TrainConfig) -> str:
    """Train an adapter as ``config`` says and return the run folder.

    Raises:
        UserError: a bad config, data or model, or an output folder that holds a different run; nothing is
            written to ``output_dir`` before the config, the model and the data have all loaded.
    """
    config.validate()
    if config.output_dir is None:
        config.output_dir = os.path.join("runs", f"{os.path.basename(config.data)}-{config.method}-r{config.rank}")
    started = time.perf_counter()
    run_dir = os.path.abspath(config.output_dir)
    checkpoint = check_output_dir(config)
    mconfig = config.matryoshka_config()
    check_report_to(config.report_to)
    args = _training_args(config, run_dir)  # checks bf16/fp16 support, optim, scheduler

    from .data import Collator, describe_counts, load_examples, tokenize_examples
    from .models import load_base_model, load_tokenizer, resolve_model

    model_path = resolve_model(config.model, config.dtype)
    tokenizer = load_tokenizer(model_path)
    examples = load_examples(config.data, "train", config.max_examples, tokenizer, seed=config.seed)
    features, counts = tokenize_examples(examples, tokenizer, config.max_length)
    is_main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate launch set RANK
    if is_main:
        print(f"data {config.data}: {describe_counts(counts, config.max_length)}", flush=True)
    if not features:
        raise UserError(f"data {config.data}: no example left to train on (all {counts['examples']} dropped); "
                        f"raise max_length (now {config.max_length})")

    _seed_everything(config.seed)
    model = load_base_model(model_path, config.dtype)
    model.config.use_cache = False
    from .model import get_matryoshka_model

    try:
        with warnings.catch_warnings():  # PEFT asks a deprecated transformers property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_matryoshka_model(model, mconfig)
    except ValueError as e:
        raise UserError(str(e)) from None

    import torch

    check_disk(run_dir, model, config)

    MatryoshkaTrainer, RankCallback, BarCallback, ProgressCallback, SignalCallback = _trainer_classes()
    signals = SignalCallback()
    created = [d for d in (run_dir, args.output_dir) if not os.path.exists(d)]
    trainer = MatryoshkaTrainer(  # its main process creates checkpoints/ (removed again if the sharding is refused)
        model=model, args=args, train_dataset=features,
        data_collator=Collator(tokenizer.pad_token_id), run_dir=run_dir, max_bad_steps=config.max_bad_steps,
        rank_callback=(rank_cb := RankCallback(config.seed)), callbacks=[rank_cb, signals])
    try:
        check_sharding(trainer, config)
    except UserError:
        for d in reversed(created if is_main else []):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty
        raise
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarCallback())

    # Everything has loaded: only now touch the output folder.
    if is_main:
        if config.overwrite and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        if checkpoint is not None:
            step = int(os.path.basename(checkpoint).split("-")[1])
            trim_log(os.path.join(run_dir, LOG_NAME), step)
        elif os.path.isfile(os.path.join(run_dir, LOG_NAME)) and not config.resume:
            os.remove(os.path.join(run_dir, LOG_NAME))
        if os.path.isfile(os.path.join(run_dir, COMPLETE_NAME)):
            os.remove(os.path.join(run_dir, COMPLETE_NAME))  # this folder is a run in progress again
        resolved = dict(config.to_dict(), output_dir=config.output_dir, model_path=model_path,
                        resume=False, overwrite=False)
        write_yaml(os.path.join(run_dir, TRAIN_CONFIG_NAME), resolved)

    if checkpoint and is_main:
        print(f"resuming from {checkpoint}", flush=True)
    signals.install()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        signals.uninstall()
    _stop_early(trainer, signals.signum, run_dir, config)

    state_dict = trainer.gathered_state_dict()  # FSDP, ZeRO-3: every process takes part in the gather
    if trainer.is_world_process_zero():
        try:
            files = save_final(trainer.accelerator.unwrap_model(trainer.model), tokenizer, run_dir, state_dict)
        except OSError as e:
            raise TrainingStopped(f"could not write the final adapter to {run_dir}: {e}; the last checkpoint "
                                  f"{latest_checkpoint(run_dir)} is intact", 1) from None
        session_tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
        seconds = time.perf_counter() - started
        summary = {
            "method": config.method, "rank": config.rank, "train_ranks": mconfig.train_ranks,
            "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "tokens": int(trainer.state.num_input_tokens_seen), "session_tokens": int(session_tokens),
            "seconds": round(seconds, 1),
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
            "peak_memory_gib": round(_peak_memory_gib(torch), 2), "examples": counts, "files": files,
        }
        write_json(os.path.join(run_dir, COMPLETE_NAME), summary)
        print_summary(summary, run_dir)
    return run_dir


def check_sharding(trainer, config: TrainConfig) -> None:
    """Refuse an FSDP the run cannot honour: asked for but not enabled (accelerate shards on accelerators only,
    not on CPU processes), or FSDP1 (from fsdp_config, or from an ``accelerate launch`` config file).

    Raises:
        UserError: on every process alike, before anything is written.
    """
    if config.fsdp and not trainer.is_fsdp_enabled:
        import accelerate

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
        import signal

        name = signal.Signals(signum).name
        raise TrainingStopped(f"stopped by {name} after step {trainer.state.global_step}; checkpoint {last}; "
                              f"continue with: {resume}", 128 + signum)


def _training_args(config: TrainConfig, run_dir: str):
    import importlib.util

    if config.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"deepspeed={config.deepspeed!r} needs the deepspeed package (pip install deepspeed; it is "
                        "not a dependency of matryoshka-lora), or remove deepspeed to train with DDP or fsdp")
    try:
        args = _build_training_args(config, run_dir)
    except ValueError as e:  # transformers' own checks: scheduler, optim, bf16 on this hardware, FSDP options, ...
        raise UserError(f"invalid config: {str(e).splitlines()[0]}") from None
    from transformers.training_args import ParallelMode

    if config.fsdp and args.parallel_mode != ParallelMode.DISTRIBUTED:  # the Trainer would refuse, with a traceback
        raise UserError(f"fsdp={config.fsdp!r} shards the model over several processes; start them with torchrun "
                        "--nproc_per_node N -m matryoshka_lora train ... or accelerate launch -m matryoshka_lora "
                        "train ... (see docs/distributed.md)")
    return args


def _build_training_args(config: TrainConfig, run_dir: str):
    import torch
    from transformers import TrainingArguments

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
        **_checkpointing_args(TrainingArguments, config.gradient_checkpointing),
        report_to=[r.strip() for r in config.report_to.split(",")] if config.report_to != "none" else "none",
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and not config.use_cpu,
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        **_sharding_args(config),
    )


def _sharding_args(config: TrainConfig) -> dict:
    """TrainingArguments' fsdp, fsdp_config and deepspeed (copies: transformers edits the mappings it gets).

    FSDP options become fsdp_config entries, as transformers does with its deprecated string form; an entry
    given in fsdp_config wins.
    """
    out = {}
    if config.fsdp:
        fsdp_config = dict(json_setting("fsdp_config", config.fsdp_config)[0] or {})
        options = config.fsdp.split()
        if "full_shard" in options or "shard_grad_op" in options:
            fsdp_config.setdefault("reshard_after_forward", "full_shard" in options)
        if "offload" in options:
            fsdp_config.setdefault("cpu_offload", True)
        out["fsdp"] = True
        if fsdp_config:
            out["fsdp_config"] = fsdp_config
    if config.deepspeed is not None:
        out["deepspeed"] = config.deepspeed if isinstance(config.deepspeed, str) else copy.deepcopy(config.deepspeed)
    return out


def check_report_to(report_to: str) -> None:
    """Raises: UserError for an unknown integration, or one whose package is not installed."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

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


def _checkpointing_args(training_args_class, enabled: bool) -> dict:
    """Gradient checkpointing, non-reentrant: the frozen base gives the reentrant form no input grads."""
    names = {f.name for f in dataclasses.fields(training_args_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    if not enabled:
        return {}
    return {prefix: True, f"{prefix}_kwargs": {"use_reentrant": False}}


def _peak_memory_gib(torch) -> float:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def print_summary(s: dict, run_dir: str) -> None:
    rel = os.path.relpath(run_dir) if not os.path.relpath(run_dir).startswith("..") else run_dir
    print(
        f"\ntrained {s['method']} R={s['rank']} (ranks {s['train_ranks']}): {s['steps']} steps in {s['seconds']:.0f} s, "
        f"{s['tokens']} tokens ({s['session_tokens'] / max(s['train_seconds'], 1e-9):.0f} tokens/s), mean train loss "
        f"{s['train_loss']:.4f}, peak memory {s['peak_memory_gib']:.2f} GiB\n"
        f"adapter, config, tokenizer and train_log.jsonl: {rel}/\n"
        f"next: matryoshka-lora eval {rel}    (accuracy at every rank, AURAC)\n"
        f"      matryoshka-lora export {rel}  (standard PEFT adapters per rank)", flush=True)
