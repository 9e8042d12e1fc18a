"""Nested-rank LoRA on stock PEFT: a gate g between ``lora_A`` and ``lora_B``.

Every adapted linear layer computes, with PEFT's own modules,

    y = W0 x + s_R · lora_B(g / s_R ⊙ lora_A(dropout(x)))  =  W0 x + B (g ⊙ A x)

where s_R = lora_alpha / r is the scale PEFT already applies. The gate g is a
non-persistent buffer on ``lora_B`` applied by a forward pre-hook, so the
weights and files stay those of a plain rank-R PEFT LoRA adapter. Which g:

    training               the method's gate (``methods.py``: P for matryoshka, s_R · 1 for lora, s_k · 1[:k]
                           for dylora with k from ``sample_rank`` once per step)
    inference at rank k    g = s_k · 1[:k]   (``inference="prefix"``: the training gate · 1[:k])
    per-example ranks      g = (B, R): row b is the rank-k_b gate (stacked methods train through these,
                           ``objectives.multi_rank_loss``)

This module wraps the model; ``selection.py`` chooses and writes the gate.

Training and evaluation run the same function through ``fused.py`` (one autograd node per layer, computing in
the activations' dtype); PEFT's forward with the hook is the reference path, kept for dropout, merged or
disabled adapters and tests (``set_fused(model, False)``).
"""
import contextlib
import copy
import os
import tempfile
import types
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import transpose

from . import fused
from .config import CONFIG_NAME, MatryoshkaConfig
from .errors import InvalidInput
from .files import move_contents
from .methods import frozen_width
from .fused import GATE
from .selection import (MatryoshkaState, apply_gates, inference_gate, matryoshka_state, sample_rank, set_fused,
                        set_rank, step_objective, use_rank)

# the rank-choosing API is part of the wrapped model's API: importable from here as before
__all__ = ["get_matryoshka_model", "adapter_shapes", "linear_names", "paper_init_", "GATE", "MatryoshkaState",
           "matryoshka_state", "set_rank", "use_rank", "set_fused", "sample_rank", "step_objective", "inference_gate"]


def get_matryoshka_model(model, config: MatryoshkaConfig, adapter_name: str = "default"):
    """Wrap a transformers model in a PEFT LoRA model of rank ``config.rank`` with nested ranks.

    Args:
        model: a ``transformers`` model (not already a ``PeftModel``).
        config: the ``MatryoshkaConfig``.
        adapter_name: the PEFT adapter name.

    Returns:
        A ``peft.PeftModel`` whose ``save_pretrained`` also writes ``matryoshka_config.json``.

    Raises:
        ValueError: the model is already a PEFT model, ``target_modules`` match nothing, the rank exceeds a
            targeted layer's smaller dimension (checked before allocating), or a targeted module cannot honour
            the gate (embeddings, convolutions, DoRA).
    """
    if isinstance(model, PeftModel):
        raise InvalidInput("the model is already a PeftModel; pass the base transformers model")
    if config.rank > _smallest_dimension(model):  # some layer may be too narrow: find out before allocating
        adapter_shapes(model, config)
    peft_model = _inject(model, config, adapter_name)
    _attach(peft_model, config, adapter_name)
    if config.init == "paper":
        paper_init_(peft_model)
    return peft_model


@contextlib.contextmanager
def peft_quietly():
    """Wrap a PeftModel construction: PEFT reads a property transformers >= 5.25 deprecated, and the FutureWarning
    would reach every user of every command."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _inject(model, config: MatryoshkaConfig, adapter_name: str = "default"):
    """PEFT's LoRA layers of rank R in ``model``, with a one-line error where target_modules match nothing."""
    try:
        with peft_quietly():
            return get_peft_model(model, _lora_config(model, config), adapter_name=adapter_name)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise InvalidInput(
                f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
                f"its linear layers are named: {', '.join(linear_names(model))} (or use 'all-linear')"
            ) from None
        raise


def adapter_shapes(model, config: MatryoshkaConfig) -> dict[str, tuple[int, int]] | None:
    """{layer name: (in, out)} of the layers ``config`` adapts in ``model``, found by adapting an empty copy of
    it on the meta device (PEFT's own target matching; nothing is allocated). None where the model cannot be
    copied so (not a transformers model): ``_attach`` checks the ranks on the real layers then.

    Raises:
        InvalidInput: the rank exceeds a targeted layer's smaller dimension (naming the layer), or
            target_modules match nothing.
    """
    with torch.random.fork_rng(devices=[]):  # building the copy draws its (meta) init: keep the seed's stream
        try:
            with torch.device("meta"):
                skeleton = type(model)(copy.deepcopy(model.config))
        except Exception:  # any model class whose constructor does not take its config alone
            return None
        shapes = _shapes(dict(_lora_layers(_inject(skeleton, config), "default")))
    _check_rank_fits(shapes, config.rank)
    return shapes


def _smallest_dimension(model) -> int:
    """The smallest side of any 2-D weight (Linear, transformers' Conv1D, embeddings): no rank up to it can be
    too large for a layer, whichever layers are targeted."""
    sides = [min(p.shape) for p in model.parameters() if p.dim() == 2]
    return min(sides) if sides else 0


def _shapes(layers: dict) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in layers.items()
            if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}


def _lora_layers(peft_model, adapter_name: str):
    """(name relative to the base model, PEFT LoRA layer) of every layer holding ``adapter_name``."""
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            yield (name[len(prefix):] if name.startswith(prefix) else name), module


def _check_rank_fits(shapes: dict[str, tuple[int, int]], rank: int) -> None:
    too_small = {name: (i, o) for name, (i, o) in shapes.items() if rank > min(i, o)}
    if too_small:
        name, (i, o) = next(iter(too_small.items()))
        most = min(min(s) for s in shapes.values())
        more = f" (and {len(too_small) - 1} more layers)" if len(too_small) > 1 else ""
        raise InvalidInput(f"rank={rank} is larger than layer {name} allows ({i} in, {o} out, so rank <= "
                           f"{min(i, o)}){more}; choose rank <= {most}, or leave such layers out of target_modules")


def _lora_config(model, config: MatryoshkaConfig) -> LoraConfig:
    task_type = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.rank * config.scale_max,  # so PEFT's alpha / r is s_R: rank R loads as itself
        target_modules=config.target_modules,
        lora_dropout=config.lora_dropout,
        task_type=task_type,
        **config.lora_kwargs,
    )


def linear_names(model) -> list[str]:
    """Distinct short names of the linear layers of ``model``, as ``target_modules`` takes them."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def _attach(peft_model, config: MatryoshkaConfig, adapter_name: str) -> MatryoshkaState:
    state = MatryoshkaState(config, adapter_name)
    layers = dict(_lora_layers(peft_model, adapter_name))
    _check_rank_fits(_shapes(layers), config.rank)
    for short, module in layers.items():
        lora_B = module.lora_B[adapter_name] if adapter_name in module.lora_B else None
        if not isinstance(lora_B, torch.nn.Linear) or adapter_name in getattr(module, "lora_variant", {}):
            raise InvalidInput(
                f"module {short!r} ({type(module).__name__}) cannot honour the matryoshka gate; "
                "target only linear layers, without DoRA or other LoRA variants"
            )
        lora_B.register_buffer(GATE, torch.ones(config.rank, device=lora_B.weight.device), persistent=False)
        lora_B.register_forward_pre_hook(_gate_hook)
        module.get_delta_weight = types.MethodType(_gated_delta_weight, module)
        fused.install(module)
        module._matryoshka_state = state
        state.layers[short] = module
    if not state.layers:
        raise InvalidInput(f"target_modules={config.target_modules!r} adapted no layer")
    peft_model.matryoshka = state
    peft_model.save_pretrained = types.MethodType(_save_pretrained, peft_model)
    apply_gates(state)
    if config.method_record.frozen_prefix:
        _freeze_prefix(state)
    return state


def _freeze_prefix(state: MatryoshkaState) -> None:
    """Gradient hooks zeroing the slices a step leaves untrained (``methods.frozen_width`` of this step's draw): rows
    of ``lora_A`` (R, in) and columns of ``lora_B`` (out, R). Zeroed before clipping and the optimizer, as the DyLoRA
    paper's detached prefix (its optimizer state still moves them, as there)."""
    def masked(dim: int):
        def hook(grad):
            width = frozen_width(state.config, state.drawn)
            if not width:
                return grad
            grad = grad.clone()
            grad.narrow(dim, 0, width).zero_()
            return grad
        return hook

    for module in state.layers.values():
        module.lora_A[state.adapter_name].weight.register_hook(masked(0))
        module.lora_B[state.adapter_name].weight.register_hook(masked(1))


def _gate_hook(lora_B, args):
    h = args[0]  # (..., R): the output of lora_A
    g = fused.broadcast_gate(getattr(lora_B, GATE), h)
    return (h * g.to(h.dtype),) + tuple(args[1:])


def _gated_delta_weight(layer, adapter):
    """PEFT's ΔW = s_R · B A, with the gate: B diag(g / s_R) A · s_R. Used by merge_adapter / merge_and_unload."""
    state = layer._matryoshka_state
    gate = getattr(layer.lora_B[adapter], GATE)
    if gate.dim() != 1 or (state.setting is None and not state.config.method_record.plain):
        raise InvalidInput(
            "cannot merge a matryoshka adapter in training mode or with per-example ranks: the merged weight "
            "would match no inference rank. Call set_rank(model, k) first, or use export_rank(..., merge=True)"
        )
    weight_A = layer.lora_A[adapter].weight.float()
    weight_B = layer.lora_B[adapter].weight.float()
    delta = transpose((weight_B * gate.float()) @ weight_A, layer.fan_in_fan_out) * layer.scaling[adapter]
    return delta.to(layer.lora_B[adapter].weight.dtype)


def _save_pretrained(peft_model, save_directory, *args, **kwargs):
    """PEFT's save, made safe to interrupt: files are written to a temporary folder and moved into place,
    ``matryoshka_config.json`` (which loading requires) removed first and written last."""
    if not kwargs.get("is_main_process", True):
        return PeftModel.save_pretrained(peft_model, save_directory, *args, **kwargs)
    os.makedirs(save_directory, exist_ok=True)
    marker = os.path.join(save_directory, CONFIG_NAME)
    if os.path.exists(marker):
        os.remove(marker)
    with tempfile.TemporaryDirectory(prefix=".saving-", dir=save_directory) as tmp:
        PeftModel.save_pretrained(peft_model, tmp, *args, **kwargs)
        move_contents(tmp, save_directory)  # PEFT nests non-default adapter names in sub-folders
    peft_model.matryoshka.config.save(save_directory)


def paper_init_(peft_model) -> None:
    """The authors' init of A: kaiming-uniform over an (in, R) tensor, i.e. U(-1/sqrt(R), 1/sqrt(R))."""
    state = matryoshka_state(peft_model)
    bound = state.config.rank ** -0.5
    with torch.no_grad():
        for layer in state.layers.values():
            layer.lora_A[state.adapter_name].weight.uniform_(-bound, bound)
