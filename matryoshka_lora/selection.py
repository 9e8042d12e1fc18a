"""Which rank a nested adapter runs at: the per-model state, and the gate each choice writes into every layer.

A *gate* g (R,) sits between ``lora_A`` and ``lora_B``: ``y = W0 x + B (g ⊙ A x)`` (see model.py). ``set_rank``
and ``use_rank`` choose inference ranks (one for the model, one per layer with 0 turning a layer's adapter
off, or one per example); ``sample_rank`` draws a training step's rank(s) as the method says (``methods.py``);
with no rank set, the method's training gate is used.
"""
import contextlib
import re

import torch
from peft.tuners.lora import LoraLayer

from .config import MatryoshkaConfig
from .errors import InvalidInput
from .fused import GATE
from .ranks import batch_gate, check_inference_rank, rank_gate


class MatryoshkaState:
    """What a wrapped model needs beyond PEFT: its config, its layers and the current gate choice."""

    def __init__(self, config: MatryoshkaConfig, adapter_name: str):
        self.config = config
        self.adapter_name = adapter_name
        self.layers: dict[str, LoraLayer] = {}  # name relative to the base model -> PEFT layer
        self.setting = None  # None (training), int, dict or tensor, as given to set_rank
        self.drawn = None  # this step's draw (DyLoRA's rank, sandwich's ranks), from sample_rank
        self.fused = True  # the fused adapter branch (fused.py) where it applies; False: PEFT's forward + hook


def matryoshka_state(model) -> MatryoshkaState:
    """The state of a matryoshka model, also through wrappers (DDP's ``.module``, torch.compile's ``_orig_mod``)."""
    for _ in range(4):
        if isinstance(getattr(model, "matryoshka", None), MatryoshkaState):
            break
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    state = getattr(model, "matryoshka", None)
    if not isinstance(state, MatryoshkaState):
        raise InvalidInput(
            f"{type(model).__name__} is not a matryoshka model; create one with get_matryoshka_model "
            "or load_matryoshka_model"
        )
    return state


def set_rank(model, k) -> None:
    """Choose the rank(s) the model runs at.

    Args:
        model: a model from ``get_matryoshka_model`` or ``load_matryoshka_model``.
        k: ``None`` (training behaviour), an int in 1..R (the whole model at rank k:
            ``y = W0x + s_k·B[:, :k]A[:k]x``), a dict ``{module-name regex: rank}`` (``re.search`` on names
            such as ``model.layers.0.self_attn.q_proj``; first match wins, unmatched modules stay at R; a rank
            in 0..R, where 0 turns that module's adapter off: ``y = W0x``; ``profiles.profile_ranks`` turns
            exact names into such a dict), or a 1-D integer tensor with one rank in 1..R per example of the
            next batches.

    Raises:
        ValueError: a rank outside 1..R (0..R in a per-layer dict), a regex that matches no layer, or the model
            is merged.
    """
    state = matryoshka_state(model)
    if any(getattr(layer, "merged", False) for layer in state.layers.values()):
        raise InvalidInput("the adapter is merged into the base weights; unmerge_adapter() before set_rank")
    R = state.config.rank
    if isinstance(k, dict):
        k = dict(k)
        _layer_ranks(state, k)  # validates
    elif isinstance(k, torch.Tensor):
        if k.dim() != 1 or k.is_floating_point() or k.numel() == 0:
            raise InvalidInput(f"per-example ranks must be a non-empty 1-D integer tensor; got shape "
                             f"{tuple(k.shape)} and dtype {k.dtype}")
        batch_gate(R, k)  # validates
    elif k is not None:
        check_inference_rank(R, k)
    state.setting = k
    apply_gates(state)


@contextlib.contextmanager
def use_rank(model, k):
    """``with use_rank(model, k):`` runs at rank(s) k (as ``set_rank``) and restores the previous choice."""
    state = matryoshka_state(model)
    previous = state.setting
    set_rank(model, k)
    try:
        yield model
    finally:
        set_rank(model, previous)


def set_fused(model, enabled: bool) -> None:
    """Use the fused adapter branch (default, ``matryoshka_lora.fused``) or PEFT's own forward with the gate hook.

    Both compute the same function; the PEFT path is the reference the fused one is tested against.
    """
    matryoshka_state(model).fused = bool(enabled)


def sample_rank(model, generator: torch.Generator | None = None) -> int | list[int] | None:
    """Draw the rank(s) of the next optimizer step. Call once per optimizer step, not per micro-batch.

    DyLoRA: k uniform over ``config.dylora_choices()``, returned. Sandwich: the largest and smallest train
    ranks plus ``sandwich_n`` others drawn without replacement, returned as a sorted list. Other methods
    draw nothing and return ``None`` (so a trainer may call it unconditionally). See ``methods.py``.
    """
    state = matryoshka_state(model)
    draw = state.config.method_record.draw
    if draw is None:
        return None
    state.drawn = draw(state.config, generator)
    if state.setting is None:
        apply_gates(state)
    return state.drawn


def inference_gate(config: MatryoshkaConfig, k: int) -> torch.Tensor:
    """The gate of rank-k inference, shape (R,): s_k·1[:k] ("paper") or P·1[:k] ("prefix": the method's
    trained function, truncated)."""
    if config.inference == "prefix":
        check_inference_rank(config.rank, k)
        return config.method_record.gate(config, None) * (torch.arange(config.rank) < k)
    return rank_gate(config.rank, k, config.scaling)


def step_objective(model) -> tuple[list[int], list[float]]:
    """(ranks, λ) of this step's stacked loss: the train ranks for "matryoshka-exact", the sandwich draw else."""
    state = matryoshka_state(model)
    stacked = state.config.method_record.stacked
    if stacked is None:
        raise InvalidInput(f"method {state.config.method!r} trains one function per step; step_objective is for "
                           "matryoshka-exact and sandwich")
    return stacked(state.config, state.drawn)


def _layer_ranks(state: MatryoshkaState, ranks: dict) -> dict[str, int]:
    """{layer name: rank in 0..R} for a {regex: rank} dict; first match wins, unmatched layers stay at R."""
    R = state.config.rank
    patterns = []
    for pattern, k in ranks.items():
        try:
            patterns.append((re.compile(pattern), k))
        except (re.error, TypeError) as e:
            raise InvalidInput(f"per-layer rank key {pattern!r} is not a valid regex: {e}") from None
        check_layer_rank(R, k, f"layers matching {pattern!r}")
    out, used = {}, set()
    for name in state.layers:
        for regex, k in patterns:
            if regex.search(name):
                out[name] = k
                used.add(regex.pattern)
                break
        else:
            out[name] = R
    unused = [p.pattern for p, _ in patterns if p.pattern not in used]
    if unused:
        example = next(iter(state.layers))
        raise InvalidInput(f"per-layer rank patterns {unused} match no adapted layer (names look like {example!r})")
    return out


def apply_gates(state: MatryoshkaState) -> None:
    """Write the gate of the current setting into every layer (divided by s_R, which PEFT multiplies back)."""
    c = state.config
    k = state.setting
    if k is None:
        gates = dict.fromkeys(state.layers, c.method_record.gate(c, state.drawn))
    elif isinstance(k, int):
        gates = dict.fromkeys(state.layers, inference_gate(c, k))
    elif isinstance(k, dict):
        by_rank = {}
        gates = {name: by_rank.setdefault(r, layer_gate(c, r)) for name, r in _layer_ranks(state, k).items()}
    else:
        gates = dict.fromkeys(state.layers, _batch_inference_gate(c, k))
    for name, layer in state.layers.items():
        lora_B = layer.lora_B[state.adapter_name]
        setattr(lora_B, GATE, (gates[name] / c.scale_max).to(lora_B.weight.device))


def check_layer_rank(rank: int, k, where: str) -> None:
    """A rank for some layers: 0 (their adapter off) or an inference rank 1..R; ``where`` names the layers."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= rank:
        raise InvalidInput(f"inference rank {k!r} for {where} is not valid; choose an integer in 0..{rank} "
                           "(0 turns the adapter off there)")


def layer_gate(config: MatryoshkaConfig, k: int) -> torch.Tensor:
    """The gate of one layer at rank k in 0..R: all zeros at 0 (the layer's adapter off), else rank k's."""
    return inference_gate(config, k) if k else torch.zeros(config.rank)


def _batch_inference_gate(config: MatryoshkaConfig, ks: torch.Tensor) -> torch.Tensor:
    """One inference gate per example, (B, R)."""
    if config.inference == "paper":
        return batch_gate(config.rank, ks, config.scaling)
    rows = {k: inference_gate(config, k) for k in ks.unique().tolist()}
    return torch.stack([rows[k] for k in ks.tolist()])
