"""TrainConfig: a run's fields on top of the adapter's (``MatryoshkaConfig``), from YAML and the command line.

Every key can be set in the YAML file or as ``--key value``; values are coerced by their field's kind and every
problem is reported at once.
"""
import dataclasses
import difflib
import os
from dataclasses import dataclass

from ..base_models import DTYPES, quantization_problem
from ..config import MatryoshkaConfig, key
from ..formats import DATA_FORMATS, columns_problem
from ..methods import TRAIN_DEFAULT_METHOD, method_help
from ..errors import UserError
from .init_adapter import init_problem
from .kinds import coerce_kind
from .sharding import sharding_problems


@dataclass
class TrainConfig(MatryoshkaConfig):
    """Everything a training run needs: the adapter's fields (inherited from ``MatryoshkaConfig``, which owns
    them, their defaults and their help) and the run's below. Values are checked by ``validate`` (a config read
    from YAML or the command line may hold strings until then), not on construction."""

    # the adapter's field with a default of its own: a run ends with a final save that can re-factor (lora-svd)
    method: str = key(TRAIN_DEFAULT_METHOD, method_help(), "str")
    # what to train
    model: str = key("smollm2", "hub id, local folder, .gguf file, or 'smollm2' (the embedded "
                     "SmolLM2-135M-Instruct)", "str")
    data: str = key("arithmetic", "arithmetic (built-in, offline), gsm8k, platypus, a .jsonl/.json/.csv/.parquet "
                    "file, a folder (train.jsonl, test.jsonl, ...) or a hub dataset id such as tatsu-lab/alpaca", "str")
    data_config: str | None = key(None, "config (subset) of a hub dataset, e.g. main for openai/gsm8k", "str?")
    data_split: str = key("train", "split to train on (a folder's <split>.jsonl; slices such as train[:1000] work)",
                          "str")
    eval_split: str = key("test", "split `eval` uses when it is not given --task (e.g. test_sft, or train[-200:])", "str")
    data_format: str = key("auto", "auto (from the columns), alpaca (instruction/input/output), sharegpt "
                           "(conversations of from/value), messages (OpenAI role/content), prompt_completion, "
                           "question_answer, or text (plain language modelling, loss on every token). Chat formats "
                           "use the model's chat template (an error without one) with the loss on every assistant "
                           "turn; auto-detected messages train the last assistant turn, as before", "str")
    data_columns: dict | None = key(None, "rename columns to the format's: prompt=question,completion=answer",
                                    "columns?")
    max_examples: int | None = key(None, "use the first N training examples (arithmetic: generate N; "
                                   "default 2000)", "int?")
    max_length: int = key(256, "tokens per example; longer examples are truncated (and counted)", "int")
    packing: bool = key(False, "pack whole examples into rows of max_length tokens (fewer padding tokens; "
                        "attention and positions restart per example; sdpa, eager or flex attention)", "bool")
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
    quantization: str = key("none", "load the base quantized with bitsandbytes (pip install bitsandbytes): none, "
                            "4bit (QLoRA: NF4, double quantization, bf16 compute) or 8bit (LLM.int8); the adapter "
                            "stays full precision and exports for the unquantized base", "str")
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
    init_adapter: str | None = key(None, "start from this saved adapter's weights (same rank, scaling and "
                                   "layers), e.g. a `matryoshka-lora svd` output to fine-tune nested", "str?")

    def __post_init__(self):
        pass  # checked by validate(), after coercion: a config built from text holds strings until then

    def to_dict(self) -> dict:
        """Every key, what to train and the method first (the order of train_config.yaml and --help)."""
        d = dataclasses.asdict(self)
        head = WHAT_TO_TRAIN + ("method",)
        return {k: d[k] for k in head} | {k: v for k, v in d.items() if k not in head}

    def matryoshka_config(self) -> MatryoshkaConfig:
        """The adapter part, as a validated ``MatryoshkaConfig``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(MatryoshkaConfig)}
        return MatryoshkaConfig(**dict(values, lora_kwargs=dict(values["lora_kwargs"])))

    def problems(self) -> list[str]:
        """Every problem with the values: the adapter's, the run's and the sharding settings'."""
        try:
            out = super().problems()
        except Exception as e:  # a type the checks did not expect
            out = [str(e)]
        return out + run_problems(self) + sharding_problems(self)

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


WHAT_TO_TRAIN = ("model", "data", "data_config", "data_split", "eval_split", "data_format", "data_columns",
                 "max_examples", "max_length", "packing")
DATA_KEYS = ("data_config", "data_split", "eval_split", "data_format", "data_columns")  # how `data` is read
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(MatryoshkaConfig))


def run_problems(c: TrainConfig) -> list[str]:
    """The problems of the run's own fields (types are checked by ``coerce``)."""
    positive = ("max_length", "batch_size", "gradient_accumulation_steps", "logging_steps", "max_bad_steps")
    out = [f"{k}={getattr(c, k)!r} is not valid; give an integer >= 1" for k in positive if getattr(c, k) < 1]
    if c.max_length == 1:
        out.append("max_length=1 leaves no room for an answer; give at least 2")
    if c.max_examples is not None and c.max_examples < 1:
        out.append(f"max_examples={c.max_examples!r} is not valid; give an integer >= 1 or none for all")
    if not c.learning_rate > 0:
        out.append(f"learning_rate={c.learning_rate!r} is not valid; give a number > 0")
    if c.max_steps == 0 or c.max_steps < -1:
        out.append(f"max_steps={c.max_steps!r} is not valid; give a number of steps >= 1, or -1 for epochs")
    if c.max_steps == -1 and not c.num_train_epochs > 0:
        out.append(f"num_train_epochs={c.num_train_epochs!r} is not valid; give a number > 0")
    if c.save_steps < 0:
        out.append(f"save_steps={c.save_steps!r} is not valid; give 0 (no checkpoints) or a number of steps")
    if c.save_total_limit is not None and c.save_total_limit < 1:
        out.append(f"save_total_limit={c.save_total_limit!r} is not valid; give an integer >= 1 or none")
    out += [f"{k}={getattr(c, k)!r} is not valid; give a number >= 0"
            for k in ("warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers") if getattr(c, k) < 0]
    if problem := init_problem(c.init_adapter):
        out.append(problem)
    if c.dtype not in DTYPES:
        out.append(f"dtype={c.dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
    if problem := quantization_problem(c.quantization):
        out.append(problem)
    elif c.quantization != "none" and (c.fsdp or c.deepspeed is not None):
        out.append(f"quantization={c.quantization} with {'fsdp' if c.fsdp else 'deepspeed'} is not supported; "
                   "train the quantized model with DDP (torchrun), or set quantization: none")
    for a, b in (("bf16", "fp16"), ("overwrite", "resume")):
        if getattr(c, a) and getattr(c, b):
            out.append(f"{a} and {b} are both set; choose one")
    if not c.model:
        out.append("model is empty; give a hub id, a local folder, a .gguf file or smollm2")
    if not c.data:
        out.append("data is empty; give arithmetic, gsm8k, platypus, a data file, a folder or a hub dataset id")
    if c.data_format not in DATA_FORMATS:
        out.append(f"data_format={c.data_format!r} is not valid; choose one of {', '.join(DATA_FORMATS)}")
    for k in ("data_split", "eval_split"):
        if not getattr(c, k):
            out.append(f"{k} is empty; give a split name such as train or test")
    problem = columns_problem(c.data_columns)
    if problem:
        out.append(problem)
    return out


def default_output_dir(config: TrainConfig, config_path: str | None = None) -> str:
    """runs/<config file name>, or runs/<data name>-<method>-r<rank> without a config file."""
    if config_path:
        return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
    data = os.path.splitext(os.path.basename(config.data.rstrip("/")))[0]
    return os.path.join("runs", f"{data}-{config.method}-r{config.rank}")


def coerce(name: str, value, from_cli: bool = False):
    """``value`` as the kind of key ``name`` (see ``kinds.coerce_kind``): (value, None) or (None, problem)."""
    return coerce_kind(FIELDS[name].metadata["kind"], name, value, from_cli)


def unknown_key_problem(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see matryoshka-lora train --help for the keys"
    return f"unknown config key {name!r}{hint}"


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
