"""Per-layer rank profiles (issue #18): one rank in 0..R for every adapted module of a nested adapter.

A profile ``{module name: rank}`` names modules as ``matryoshka_state(model).layers`` does (relative to the base
model: ``model.layers.0.self_attn.q_proj``). ``profile_ranks`` turns it into the per-layer dict ``use_rank``
takes; ``export_profile`` writes it as one standard PEFT LoRA folder with the same logits. Rank 0 turns a
module's adapter off. No file format beyond the PEFT folder: the profile lives in its ``rank_pattern``.
"""
import os
import re

import torch

from .adapter_io import read_adapter, write_adapter_dir
from .config import MatryoshkaConfig
from .errors import InvalidInput
from .files import atomic_dir
from .selection import check_layer_rank, inference_gate

KEY_PREFIX = "base_model.model."  # PEFT's prefix of base-model module names in adapter_model.safetensors
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


def profile_ranks(profile: dict[str, int]) -> dict[str, int]:
    """The profile as ``set_rank`` / ``use_rank`` take it: each name escaped and anchored (``^name$``), since
    they read keys as regexes with ``re.search``, where a bare name could also match longer names."""
    return {f"^{re.escape(name)}$": k for name, k in profile.items()}


def adapted_modules(weights: dict[str, torch.Tensor]) -> list[str]:
    """The module names (relative to the base model) that PEFT LoRA tensors adapt, in file order."""
    return [key[len(KEY_PREFIX):-len(A_KEY)] for key in weights
            if key.startswith(KEY_PREFIX) and key.endswith(A_KEY)]


def check_profile(profile, names: list[str], rank: int) -> None:
    """Raises: InvalidInput (one line) unless ``profile`` gives every module of ``names`` a rank in 0..rank, names
    nothing else, and leaves at least one module on."""
    if not isinstance(profile, dict):
        raise InvalidInput(f"a rank profile is a dict {{module name: rank}}; got {type(profile).__name__}")
    known = set(names)
    unknown = [n for n in profile if n not in known]
    if unknown:
        raise InvalidInput(f"the profile names {len(unknown)} modules the adapter does not adapt: "
                           f"{_first(unknown)}; adapted modules are named like {names[0]!r}")
    missing = [n for n in names if n not in profile]
    if missing:
        raise InvalidInput(f"the profile leaves out {len(missing)} adapted modules: {_first(missing)}; give "
                           f"every adapted module a rank in 0..{rank} (0 turns its adapter off)")
    for name, k in profile.items():
        check_layer_rank(rank, k, repr(name))
    if not any(profile.values()):
        raise InvalidInput("every module of the profile is at rank 0, which is the base model itself; give at "
                           f"least one module a rank in 1..{rank}")


def _first(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(map(repr, names[:n])) + more


def export_profile(model_or_dir, profile: dict[str, int], out_dir, pad: bool = False,
                   inference: str | None = None) -> str:
    """Write a rank profile as a standard PEFT LoRA adapter: stock ``PeftModel.from_pretrained`` gives the logits
    of ``use_rank(model, profile_ranks(profile))``.

    Each module at rank k holds A[:k] and B[:, :k]·g_k[:k] (g_k its inference gate: s_k·1, or P under
    ``inference="prefix"``) with ``r == lora_alpha == k`` through ``rank_pattern`` / ``alpha_pattern``, so PEFT's
    own scale is 1; ``r`` is the profile's largest rank, and modules at rank 0 are left out of
    ``target_modules``. With ``pad``, every module has that largest rank (for engines such as vLLM that need one
    rank): the slices beyond a module's own rank are zeros, and modules at rank 0 stay, all zeros.

    Args:
        model_or_dir: a matryoshka model in memory, or a folder written by its ``save_pretrained``.
        profile: {module name: rank in 0..R} naming every adapted module (``matryoshka_state(model).layers``).
        out_dir: the folder to write (replaced atomically: written beside it, then renamed).
        pad: one rank for all modules, as above.
        inference: "paper" or "prefix" to read the trained weights under that rule instead of the run's own.

    Returns:
        ``out_dir``.

    Raises:
        InvalidInput: a module missing from or unknown to the profile, a rank outside 0..R, every rank 0, or an
            ``inference`` the run's method cannot use.
    """
    config, peft_config, weights = read_adapter(model_or_dir)
    config = config.read_as(inference)
    check_profile(profile, adapted_modules(weights), config.rank)
    top = max(profile.values())
    tensors = _profile_weights(weights, profile, config, top if pad else None)
    with atomic_dir(out_dir) as tmp:
        write_adapter_dir(tmp, tensors, _profile_peft_config(peft_config, profile, top, pad))
    return os.fspath(out_dir)


def _profile_weights(weights: dict, profile: dict[str, int], config: MatryoshkaConfig, width: int | None) -> dict:
    """Each module's A rows and B columns cut to ``width`` (None: its own rank; rank-0 modules then dropped), zero
    beyond its own rank, its gate folded into B; other tensors (``modules_to_save``) as they are."""
    out = {k: t.contiguous() for k, t in weights.items() if not k.endswith((A_KEY, B_KEY))}
    for name, k in profile.items():
        w = k if width is None else width
        if w == 0:
            continue
        gate = torch.zeros(w)
        if k:
            gate[:k] = inference_gate(config, k)[:k]  # zero beyond k: B's extra columns are zeros when padded
        A, B = weights[KEY_PREFIX + name + A_KEY], weights[KEY_PREFIX + name + B_KEY]
        out[KEY_PREFIX + name + A_KEY] = (A[:w] * (torch.arange(w) < k)[:, None].to(A.dtype)).contiguous()
        out[KEY_PREFIX + name + B_KEY] = (B[:, :w].float() * gate).to(B.dtype).contiguous()
    return out


def _profile_peft_config(peft_config: dict, profile: dict[str, int], top: int, pad: bool) -> dict:
    """adapter_config.json of the profile: explicit module names (PEFT matches a list entry as the whole name or
    a dotted suffix, so ``model.layers.1.x`` never takes ``model.layers.10.x``), per-module r == alpha."""
    kept = sorted(name for name, k in profile.items() if pad or k > 0)
    patterns = {}
    if not pad:
        # PEFT matches rank_pattern keys as regexes, ``(.*\.)?(key)$``, first key first: escaped names, longest
        # first, so a name that is the dotted tail of another cannot take that one's rank.
        patterns = {re.escape(name): profile[name] for name in sorted(kept, key=len, reverse=True)}
    # The explicit names say which modules are adapted; the run's layer filters would only narrow them again.
    filters = {key: None for key in ("layers_to_transform", "layers_pattern", "exclude_modules") if key in peft_config}
    return dict(peft_config, r=top, lora_alpha=top, target_modules=kept, rank_pattern=patterns,
                alpha_pattern=dict(patterns), **filters)


__all__ = ["profile_ranks", "export_profile", "check_profile", "adapted_modules"]
