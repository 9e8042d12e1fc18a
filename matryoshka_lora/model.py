"""Nested-rank LoRA on stock PEFT: a gate g between ``lora_A`` and ``lora_B``.

Every adapted linear layer computes, with PEFT's own modules,

    y = W0 x + s_R · lora_B(g / s_R ⊙ lora_A(dropout(x)))  =  W0 x + B (g ⊙ A x)

where s_R = lora_alpha / r is the scale PEFT already applies. The gate g is a
non-persistent buffer on ``lora_B`` applied by a forward pre-hook, so the
weights and files stay those of a plain rank-R PEFT LoRA adapter. Which g:

    training, matryoshka   g = P            (Algorithm 1)
    training, lora         g = s_R · 1
    training, dylora       g = s_k · 1[:k]   (k from ``sample_rank`` once per step)
    inference at rank k    g = s_k · 1[:k]   (``inference="prefix"``: P · 1[:k])
    per-example ranks      g = (B, R): row b is the rank-k_b gate
    matryoshka-exact,      per-example gates over a batch stacked across ranks (``multi_rank_loss``)
    sandwich

Training and evaluation run the same function through ``fused.py`` (one autograd node per layer, computing in
the activations' dtype); PEFT's forward with the hook is the reference path, kept for dropout, merged or
disabled adapters and tests (``set_fused(model, False)``).
"""
import contextlib
import os
import re
import tempfile
import types

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import transpose

from . import fused
from .config import CONFIG_NAME, MatryoshkaConfig
from .ranks import batch_gate, check_inference_rank, rank_gate
from .errors import InvalidInput

GATE = fused.GATE


class MatryoshkaState:
    """What a wrapped model needs beyond PEFT: its config, its layers and the current gate choice."""

    def __init__(self, config: MatryoshkaConfig, adapter_name: str):
        self.config = config
        self.adapter_name = adapter_name
        self.layers: dict[str, LoraLayer] = {}  # name relative to the base model -> PEFT layer
        self.setting = None  # None (training), int, dict or tensor, as given to set_rank
        self.dylora_rank = config.rank  # the rank DyLoRA trains until sample_rank draws one
        self.step_ranks: list[int] | None = None  # the ranks of this step's sandwich loss
        self.fused = True  # the fused adapter branch (fused.py) where it applies; False: PEFT's forward + hook


def get_matryoshka_model(model, config: MatryoshkaConfig, adapter_name: str = "default"):
    """Wrap a transformers model in a PEFT LoRA model of rank ``config.rank`` with nested ranks.

    Args:
        model: a ``transformers`` model (not already a ``PeftModel``).
        config: the ``MatryoshkaConfig``.
        adapter_name: the PEFT adapter name.

    Returns:
        A ``peft.PeftModel`` whose ``save_pretrained`` also writes ``matryoshka_config.json``.

    Raises:
        ValueError: the model is already a PEFT model, ``target_modules`` match nothing, or a targeted
            module cannot honour the gate (embeddings, convolutions, DoRA).
    """
    if isinstance(model, PeftModel):
        raise InvalidInput("the model is already a PeftModel; pass the base transformers model")
    lora_config = _lora_config(model, config)
    try:
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise InvalidInput(
                f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
                f"its linear layers are named: {', '.join(linear_names(model))} (or use 'all-linear')"
            ) from None
        raise
    _attach(peft_model, config, adapter_name)
    if config.init == "paper":
        paper_init_(peft_model)
    return peft_model


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
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        short = name[len(prefix):] if name.startswith(prefix) else name
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
    _apply(state)
    return state


def _gate_hook(lora_B, args):
    h = args[0]  # (..., R): the output of lora_A
    g = fused.broadcast_gate(getattr(lora_B, GATE), h)
    return (h * g.to(h.dtype),) + tuple(args[1:])


def _gated_delta_weight(layer, adapter):
    """PEFT's ΔW = s_R · B A, with the gate: B diag(g / s_R) A · s_R. Used by merge_adapter / merge_and_unload."""
    state = layer._matryoshka_state
    gate = getattr(layer.lora_B[adapter], GATE)
    if gate.dim() != 1 or (state.setting is None and state.config.method != "lora"):
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
        for root, _, files in os.walk(tmp):  # PEFT nests non-default adapter names in sub-folders
            for name in files:
                src = os.path.join(root, name)
                dst = os.path.join(save_directory, os.path.relpath(src, tmp))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
    peft_model.matryoshka.config.save(save_directory)


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
            such as ``model.layers.0.self_attn.q_proj``; first match wins, unmatched modules stay at R), or a 1-D
            integer tensor with one rank per example of the next batches.

    Raises:
        ValueError: a rank outside 1..R, a regex that matches no layer, or the model is merged.
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
    _apply(state)


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
    draw nothing and return ``None`` (so a trainer may call it unconditionally).
    """
    state = matryoshka_state(model)
    if state.config.method == "sandwich":
        return _sample_sandwich(state, generator)
    if state.config.method != "dylora":
        return None
    choices = state.config.dylora_choices()
    k = choices[int(torch.randint(len(choices), (1,), generator=generator).item())]
    state.dylora_rank = k
    if state.setting is None:
        _apply(state)
    return k


def _sample_sandwich(state: MatryoshkaState, generator) -> list[int]:
    S = state.config.train_ranks
    middle = S[1:-1]
    n = min(state.config.sandwich_n, len(middle))
    picked = torch.randperm(len(middle), generator=generator)[:n].tolist()
    state.step_ranks = sorted({S[0], S[-1], *(middle[i] for i in picked)})
    return state.step_ranks


def _training_gate(state: MatryoshkaState) -> torch.Tensor:
    c = state.config
    if c.method == "matryoshka":
        return c.p()
    if c.method == "dylora":
        return rank_gate(c.rank, state.dylora_rank, c.scaling)
    return rank_gate(c.rank, c.rank, c.scaling)  # lora; and stacked methods outside multi_rank_loss


def inference_gate(config: MatryoshkaConfig, k: int) -> torch.Tensor:
    """The gate of rank-k inference, shape (R,): s_k·1[:k] ("paper") or P·1[:k] ("prefix")."""
    if config.inference == "prefix":
        full = config.p() if config.method == "matryoshka" else rank_gate(config.rank, config.rank, config.scaling)
        check_inference_rank(config.rank, k)
        return full * (torch.arange(config.rank) < k)
    return rank_gate(config.rank, k, config.scaling)


def step_objective(model) -> tuple[list[int], list[float]]:
    """(ranks, λ) of this step's stacked loss: the train ranks for "matryoshka-exact", the sandwich draw else."""
    state = matryoshka_state(model)
    c = state.config
    if c.method == "matryoshka-exact":
        return list(c.train_ranks), c.lambdas()
    if c.method == "sandwich":
        ranks = state.step_ranks or sorted({c.train_ranks[0], c.rank})
        return ranks, [1.0 / len(ranks) if c.p_normalize else 1.0] * len(ranks)
    raise InvalidInput(f"method {c.method!r} trains one function per step; step_objective is for "
                     "matryoshka-exact and sandwich")


def _layer_ranks(state: MatryoshkaState, ranks: dict) -> dict[str, int]:
    """{layer name: rank} for a {regex: rank} dict; first match wins, unmatched layers stay at R."""
    R = state.config.rank
    patterns = []
    for pattern, k in ranks.items():
        try:
            patterns.append((re.compile(pattern), k))
        except (re.error, TypeError) as e:
            raise InvalidInput(f"per-layer rank key {pattern!r} is not a valid regex: {e}") from None
        check_inference_rank(R, k)
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


def _apply(state: MatryoshkaState) -> None:
    """Write the gate of the current setting into every layer (divided by s_R, which PEFT multiplies back)."""
    c = state.config
    k = state.setting
    if k is None:
        gates = dict.fromkeys(state.layers, _training_gate(state))
    elif isinstance(k, int):
        gates = dict.fromkeys(state.layers, inference_gate(c, k))
    elif isinstance(k, dict):
        by_rank = {}
        gates = {name: by_rank.setdefault(r, inference_gate(c, r)) for name, r in _layer_ranks(state, k).items()}
    else:
        gates = dict.fromkeys(state.layers, _batch_inference_gate(c, k))
    for name, layer in state.layers.items():
        lora_B = layer.lora_B[state.adapter_name]
        setattr(lora_B, GATE, (gates[name] / c.scale_max).to(lora_B.weight.device))


def _batch_inference_gate(config: MatryoshkaConfig, ks: torch.Tensor) -> torch.Tensor:
    """One inference gate per example, (B, R)."""
    if config.inference == "paper":
        return batch_gate(config.rank, ks, config.scaling)
    rows = {k: inference_gate(config, k) for k in ks.unique().tolist()}
    return torch.stack([rows[k] for k in ks.tolist()])


def paper_init_(peft_model) -> None:
    """The authors' init of A: kaiming-uniform over an (in, R) tensor, i.e. U(-1/sqrt(R), 1/sqrt(R))."""
    state = matryoshka_state(peft_model)
    bound = state.config.rank ** -0.5
    with torch.no_grad():
        for layer in state.layers.values():
            layer.lora_A[state.adapter_name].weight.uniform_(-bound, bound)
