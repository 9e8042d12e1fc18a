"""FSDP2 and DeepSpeed settings: pure functions of a config's ``fsdp``, ``fsdp_config`` and ``deepspeed`` values
(see docs/distributed.md)."""
import copy
import json
import os

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


def sharding_args(config) -> dict:
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
