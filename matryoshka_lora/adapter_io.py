"""Loading, strict checking and exporting nested adapters in the standard PEFT file format."""
import json
import os
import shutil
import tempfile
import warnings

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, MatryoshkaConfig
from .model import get_matryoshka_model, inference_gate, matryoshka_state
from .ranks import check_inference_rank

WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated, corrupt, or does not fit the model."""


def read_weights(directory) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/adapter_model.safetensors``; errors name the file."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        hint = " (only .bin weights found: convert them to safetensors)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""
        raise AdapterFileError(f"{path} not found{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is truncated or corrupt: {e}") from None


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
        AdapterFileError: a file is missing or corrupt, or adapter keys are missing, unexpected or of the
            wrong shape for ``base_model`` (all listed).
    """
    config = MatryoshkaConfig.load(directory)
    weights = read_weights(directory)
    _warn_on_other_base(base_model, directory)
    model = get_matryoshka_model(base_model, config, adapter_name)
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    check_keys(expected, weights, os.path.join(directory, WEIGHTS_NAME))
    set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


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


def _source(model_or_dir):
    """(MatryoshkaConfig, PEFT adapter config dict, weights) of a model in memory or a saved folder."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = os.fspath(model_or_dir)
        return (MatryoshkaConfig.load(directory), read_json(os.path.join(directory, ADAPTER_CONFIG_NAME)),
                read_weights(directory))
    state = matryoshka_state(model_or_dir)
    peft_config = model_or_dir.peft_config[state.adapter_name].to_dict()
    weights = get_peft_model_state_dict(model_or_dir, adapter_name=state.adapter_name)
    return state.config, peft_config, {k: v.detach().cpu() for k, v in weights.items()}


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
    config, peft_config, weights = _source(model_or_dir)
    config = config.read_as(inference)
    check_inference_rank(config.rank, rank)
    sliced = slice_weights(weights, rank, inference_gate(config, rank)[:rank])
    peft_config = dict(peft_config, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
    if merge:
        return _export_merged(model_or_dir, peft_config, sliced, out_dir, base_model)
    with _atomic_dir(out_dir) as tmp:
        save_file(sliced, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(_json_ready(peft_config), f, indent=2)
    return os.fspath(out_dir)


def export_all_ranks(model_or_dir, out_dir, ranks=None, merge: bool = False, base_model=None,
                     inference: str | None = None) -> dict[int, str]:
    """``export_rank`` for every rank (default: the train ranks) into ``out_dir/rank-{k}``."""
    config = _source(model_or_dir)[0] if ranks is None else None
    ranks = list(ranks) if ranks is not None else config.train_ranks
    return {k: export_rank(model_or_dir, k, os.path.join(out_dir, f"rank-{k}"), merge, base_model, inference)
            for k in ranks}


def _export_merged(model_or_dir, peft_config, sliced, out_dir, base_model) -> str:
    """Merge a rank-k adapter into a base model through stock PEFT and save the full model."""
    from peft import PeftModel

    if isinstance(model_or_dir, (str, os.PathLike)):
        if base_model is None:
            raise ValueError("merge=True from a folder needs base_model=<the transformers base model>")
    else:
        base_model = _unwrapped_copy(model_or_dir)
    with tempfile.TemporaryDirectory() as adapter_dir:
        save_file(sliced, os.path.join(adapter_dir, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(_json_ready(peft_config), f, indent=2)
        merged = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()
    with _atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
    return os.fspath(out_dir)


def _unwrapped_copy(peft_model):
    """A plain copy of the base model of ``peft_model``, without LoRA layers (the original is untouched)."""
    import copy

    with peft_model.disable_adapter():
        base = copy.deepcopy(peft_model.get_base_model())
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base


class _atomic_dir:
    """Write a folder beside ``path`` and rename it into place only when complete."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="." + os.path.basename(self.path) + ".tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.isdir(self.path):
            old = self.tmp + ".old"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)
        return False


__all__ = ["load_matryoshka_model", "export_rank", "export_all_ranks", "read_weights", "AdapterFileError",
           "CONFIG_NAME"]
