"""Loading, strict checking and exporting nested adapters in the standard PEFT file format."""
import copy
import json
import os
import tempfile
import warnings

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base_models import load_base_model, load_tokenizer
from .config import MatryoshkaConfig
from .errors import AdapterFileError, UserError
from .files import atomic_dir
from .model import get_matryoshka_model, peft_quietly
from .ranks import check_inference_rank
from .rundir import ADAPTER_CONFIG as ADAPTER_CONFIG_NAME, MATRYOSHKA_CONFIG as CONFIG_NAME, TRAIN_CONFIG
from .rundir import WEIGHTS as WEIGHTS_NAME, read_train_config, run_model_name, warn_if_not_nested
from .selection import inference_gate, matryoshka_state


def read_weights(directory) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/adapter_model.safetensors``; errors name the file."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        hint = " (only .bin weights found: convert them to safetensors)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""
        raise AdapterFileError(f"{path} not found{hint}")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is truncated or corrupt: {e}") from None
    check_finite(weights, path)
    return weights


def check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    """Raises: AdapterFileError naming the first tensor holding NaN or Inf (a diverged run, a corrupt file)."""
    for key, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            what = "NaN" if torch.isnan(t).any() else "Inf"
            raise AdapterFileError(f"{where}: tensor {key} holds {what} values; refusing an adapter that would "
                                   "compute NaN (was its run diverging? evaluate an earlier checkpoint)")


def read_checked(directory) -> tuple[MatryoshkaConfig, dict | None, dict[str, torch.Tensor]]:
    """(config, adapter_config.json or None where absent, weights) of a saved nested adapter, after checking that
    its files agree with each other: the tensors' rank is matryoshka_config.json's ``rank`` and
    adapter_config.json's ``r``, and ``lora_alpha`` is R·s_R (so stock PEFT loads rank R at its scale).

    Raises:
        AdapterFileError: a file missing, corrupt, or contradicting another, naming the file that is wrong.
    """
    directory = os.fspath(directory)
    config = MatryoshkaConfig.load(directory)
    weights = read_weights(directory)
    peft_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    peft_config = read_json(peft_path) if os.path.isfile(peft_path) else None
    ranks = {t.shape[0] for k, t in weights.items() if "lora_A" in k and t.dim() == 2}
    tensor_rank = ranks.pop() if len(ranks) == 1 else None  # mixed ranks: check_keys names the odd tensors
    where = f"the tensors of {os.path.join(directory, WEIGHTS_NAME)} have rank {tensor_rank}"
    if tensor_rank is not None and config.rank != tensor_rank:
        raise AdapterFileError(f"{os.path.join(directory, CONFIG_NAME)} says rank={config.rank} but {where}; "
                               "the file is wrong or belongs to another adapter")
    if peft_config is not None:
        _check_peft_config(peft_config, config, peft_path, tensor_rank, where)
    return config, peft_config, weights


def _check_peft_config(peft_config: dict, config: MatryoshkaConfig, path: str, tensor_rank, where: str) -> None:
    r, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    if tensor_rank is not None and r != tensor_rank:
        raise AdapterFileError(f"{path} says r={r!r} but {where}; the file is wrong or belongs to another adapter")
    want = config.rank * config.scale_max
    if not isinstance(alpha, (int, float)) or abs(alpha - want) > 1e-6 * max(1.0, want):
        raise AdapterFileError(f"{path} says lora_alpha={alpha!r} but matryoshka_config.json (rank {config.rank}, "
                               f"scaling {config.scaling!r}) gives R·s_R = {want:g}; stock PEFT would load the "
                               "adapter at another scale")


def check_target_modules(peft_config: dict | None, model, adapter_name: str, path: str) -> None:
    """Raises: AdapterFileError when adapter_config.json's target_modules are not the modules the model adapts."""
    if peft_config is None or "target_modules" not in peft_config:
        return
    saved = _module_names(peft_config["target_modules"])
    built = _module_names(model.peft_config[adapter_name].target_modules)
    if saved != built:
        raise AdapterFileError(f"{path} says target_modules={saved} but matryoshka_config.json adapts {built} on "
                               "this model; stock PEFT would adapt other modules than the trained ones")


def _module_names(target_modules):
    """A regex (a string) as it is; names in a canonical order."""
    return target_modules if isinstance(target_modules, str) or target_modules is None else sorted(target_modules)


def read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise AdapterFileError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None


def load_matryoshka_model(base_model, directory, is_trainable: bool = False, adapter_name: str = "default"):
    """Rebuild a model saved by ``save_pretrained``: PEFT weights plus ``matryoshka_config.json``.

    Raises:
        AdapterFileError: a file is missing or corrupt, the files contradict each other (``read_checked``),
            tensors hold NaN or Inf, or adapter keys are missing, unexpected or of the wrong shape for
            ``base_model`` (all listed).
    """
    config, peft_config, weights = read_checked(directory)
    _warn_on_other_base(base_model, directory)
    warn_if_not_nested(config, directory)
    model = get_matryoshka_model(base_model, config, adapter_name)
    check_target_modules(peft_config, model, adapter_name, os.path.join(directory, ADAPTER_CONFIG_NAME))
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    check_keys(expected, weights, os.path.join(directory, WEIGHTS_NAME))
    set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def load_run(run_dir: str, dtype: str = "float32", device=None, quantization: str | None = None):
    """Load a finished training run: (PEFT model at training behaviour, tokenizer, train config dict).

    The base model is the one named in ``train_config.yaml`` (``model_path`` when it still exists,
    else ``model``), quantized as ``quantization`` says (None: as the run was trained, see
    ``base_models.load_base_model``); the adapter is the final one at the top of ``run_dir``.

    Raises:
        UserError: not a run folder, or the base model cannot be found.
        AdapterFileError: adapter files missing or corrupt.
    """
    config = read_train_config(run_dir)
    model_name = run_model_name(config)
    if not model_name:
        raise UserError(f"{os.path.join(run_dir, TRAIN_CONFIG)} names no model")
    quantization = config.get("quantization", "none") if quantization is None else quantization
    base = load_base_model(model_name, dtype=dtype, device=device, quantization=quantization)
    model = load_matryoshka_model(base, run_dir)
    tokenizer_dir = run_dir if os.path.isfile(os.path.join(run_dir, "tokenizer_config.json")) else model_name
    tokenizer = load_tokenizer(tokenizer_dir)
    return model, tokenizer, config


def _warn_on_other_base(base_model, directory) -> None:
    """Shapes are checked strictly; a base model of another name with the same shapes only warns."""
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        return
    trained_on = read_json(path).get("base_model_name_or_path")
    given = getattr(getattr(base_model, "config", None), "_name_or_path", None) or getattr(base_model, "name_or_path", None)
    if trained_on and given and os.path.basename(os.path.normpath(str(trained_on))) != os.path.basename(
            os.path.normpath(str(given))):
        warnings.warn(f"the adapter in {directory} was trained on {trained_on!r} but is being loaded onto "
                      f"{given!r}; the shapes fit, but check that this is the model you meant", stacklevel=3)


def check_keys(expected: dict, got: dict, path: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(got)) if got[k].shape != expected[k].shape]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise AdapterFileError(f"{path} does not fit this model: " + "; ".join(problems))


def slice_weights(weights: dict[str, torch.Tensor], k: int, scale) -> dict[str, torch.Tensor]:
    """Rank-k prefix of PEFT LoRA tensors with ``scale`` (a number, or a (k,) gate) folded into B:
    A[:k] (k, in) and B[:, :k]·scale (out, k)."""
    out = {}
    for key, t in weights.items():
        if "lora_A" in key:
            out[key] = t[:k].contiguous()
        elif "lora_B" in key:
            out[key] = (t[:, :k].float() * scale).to(t.dtype).contiguous()
        else:
            out[key] = t.contiguous()
    return out


def read_adapter(model_or_dir):
    """(MatryoshkaConfig, PEFT adapter config dict, weights) of a model in memory or a saved folder."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        config, peft_config, weights = read_checked(model_or_dir)
        if peft_config is None:
            read_json(os.path.join(model_or_dir, ADAPTER_CONFIG_NAME))  # raises, naming the missing file
        return config, peft_config, weights
    state = matryoshka_state(model_or_dir)
    peft_config = model_or_dir.peft_config[state.adapter_name].to_dict()
    weights = {k: v.detach().cpu() for k, v in
               get_peft_model_state_dict(model_or_dir, adapter_name=state.adapter_name).items()}
    check_finite(weights, "the adapter in memory")
    return state.config, peft_config, weights


def _json_ready(d: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def export_rank(model_or_dir, rank: int, out_dir, merge: bool = False, base_model=None,
                inference: str | None = None) -> str:
    """Write rank ``rank`` as a standard PEFT LoRA adapter (or, with ``merge``, a full merged model).

    The adapter holds A[:k] and s_k·B[:, :k] (``inference="prefix"``: B[:, :k]·P[:k]) with
    ``r == lora_alpha == k``, so stock
    ``PeftModel.from_pretrained`` gives the logits of ``use_rank(model, k)``.

    Args:
        model_or_dir: a matryoshka model in memory, or a folder written by its ``save_pretrained``.
        rank: k in 1..R.
        out_dir: the folder to write (replaced atomically: written beside it, then renamed).
        merge: write the base model with s_k·B[:, :k]A[:k] merged into its weights instead.
        base_model: the base model to merge into when ``model_or_dir`` is a folder.
        inference: "paper" or "prefix" to read the trained weights under that rule instead of the run's own.

    Returns:
        ``out_dir``.

    Raises:
        InvalidInput: ``rank`` outside 1..R, or an ``inference`` the run's method cannot use.
    """
    config, peft_config, weights = read_adapter(model_or_dir)
    warn_if_not_nested(config, model_or_dir)
    config = config.read_as(inference)
    check_inference_rank(config.rank, rank)
    sliced = slice_weights(weights, rank, inference_gate(config, rank)[:rank])
    peft_config = dict(peft_config, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
    if merge:
        return _export_merged(model_or_dir, peft_config, sliced, out_dir, base_model)
    with atomic_dir(out_dir) as tmp:
        write_adapter_dir(tmp, sliced, peft_config)
    return os.fspath(out_dir)


def export_all_ranks(model_or_dir, out_dir, ranks=None, merge: bool = False, base_model=None,
                     inference: str | None = None) -> dict[int, str]:
    """``export_rank`` for every rank (default: the train ranks) into ``out_dir/rank-{k}``."""
    config = read_adapter(model_or_dir)[0] if ranks is None else None
    ranks = list(ranks) if ranks is not None else config.train_ranks
    return {k: export_rank(model_or_dir, k, os.path.join(out_dir, f"rank-{k}"), merge, base_model, inference)
            for k in ranks}


def write_adapter_dir(directory, weights: dict, peft_config: dict, config: MatryoshkaConfig | None = None) -> None:
    """A PEFT adapter folder: ``adapter_model.safetensors`` and ``adapter_config.json`` (and, for a nested
    adapter, ``matryoshka_config.json``, written last). Wrap in ``files.atomic_dir`` for an all-or-nothing write."""
    save_file(weights, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(_json_ready(peft_config), f, indent=2)
    if config is not None:
        config.save(directory)


def _export_merged(model_or_dir, peft_config, sliced, out_dir, base_model) -> str:
    """Merge a rank-k adapter into a base model through stock PEFT and save the full model."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        if base_model is None:
            raise ValueError("merge=True from a folder needs base_model=<the transformers base model>")
    else:
        base_model = _unwrapped_copy(model_or_dir)
    with tempfile.TemporaryDirectory() as adapter_dir:
        write_adapter_dir(adapter_dir, sliced, peft_config)
        with peft_quietly():
            merged = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
    return os.fspath(out_dir)


def _unwrapped_copy(peft_model):
    """A plain copy of the base model of ``peft_model``, without LoRA layers (the original is untouched)."""
    with peft_model.disable_adapter():
        base = copy.deepcopy(peft_model.get_base_model())
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base


__all__ = ["load_matryoshka_model", "load_run", "export_rank", "export_all_ranks", "read_weights", "write_adapter_dir",
           "AdapterFileError", "CONFIG_NAME"]
