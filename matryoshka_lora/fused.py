"""The adapter branch as one autograd function: the fast path of every adapted linear layer.

PEFT computes ``result + lora_B(lora_A(dropout(x.to(fp32)))) * s`` in five autograd nodes, casting the
activations to the adapters' dtype (fp32 by default) and keeping that copy for backward. With the gate
``e = g · s`` (R,) or per example (B, R), this module computes the same function

    h = (x Aᵀ) ⊙ e                  # (N, R)
    y = base + h Bᵀ                 # one addmm into the base output: (N, out)

    ∂B = ∂yᵀ h        ∂h = (∂y B) ⊙ e        ∂A = ∂hᵀ x        ∂x = ∂h A

in the compute dtype of the activations (bf16 under a bf16 model or autocast), reading A and B once in that
dtype, keeping only x (already alive for the base layer's backward chain) and h (N, R) for backward, and
returning gradients in the dtype of the master weights (fp32 by default). The reference path (PEFT's own
forward plus the gate pre-hook) stays in use for dropout in training, merged or disabled adapters, several
active adapters, PEFT's ``adapter_names`` batches and LoRA variants, and whenever ``set_fused(model, False)``.
"""
import types

import torch

from .errors import InvalidInput

GATE = "matryoshka_gate"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def broadcast_gate(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(R,) or per-example (B, R) gate shaped to multiply h (B, ..., R).

    Raises:
        ValueError: per-example gates for a batch of another size.
    """
    if e.dim() == 1:
        return e
    if h.dim() < 2 or h.shape[0] != e.shape[0]:
        raise InvalidInput(
            f"per-example ranks were set for a batch of {e.shape[0]} but the layer got a batch of shape "
            f"{tuple(h.shape[:-1])}; call set_rank with one rank per example of this batch"
        )
    return e.view(e.shape[0], *([1] * (h.dim() - 2)), e.shape[1])


class GatedLoRA(torch.autograd.Function):
    """``base + ((x Aᵀ) ⊙ e) Bᵀ`` with hand-written backward; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, base, x, weight_A, weight_B, gate, scaling):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c, A, B = x.to(dtype), weight_A.to(dtype), weight_B.to(dtype)
            e = gate.to(torch.promote_types(gate.dtype, dtype)) * scaling  # (R,) or (B, R); fp32 at least
            h = x_c @ A.t()  # (..., R)
            h = (h * broadcast_gate(e, h)).to(dtype)
            out = base.reshape(-1, base.shape[-1])
            out = torch.addmm(out.to(dtype), h.reshape(-1, h.shape[-1]), B.t())  # (N, out)
        ctx.save_for_backward(x_c, A, B, h, e)
        ctx.dtypes = (x.dtype, weight_A.dtype, weight_B.dtype, base.dtype)
        return out.view(base.shape).to(base.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_c, A, B, h, e = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype, base_dtype = ctx.dtypes
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(A.dtype)
            g2, h2, x2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1]), x_c.reshape(-1, x_c.shape[-1])
            grad_B = g2.t() @ h2 if ctx.needs_input_grad[3] else None  # (out, R)
            dh = ((g @ B) * broadcast_gate(e, h)).to(A.dtype)  # (..., R)
            dh2 = dh.reshape(-1, dh.shape[-1])
            grad_A = dh2.t() @ x2 if ctx.needs_input_grad[2] else None  # (R, in)
            grad_x = (dh @ A).to(x_dtype) if ctx.needs_input_grad[1] else None
        grad_base = grad.to(base_dtype) if ctx.needs_input_grad[0] else None
        return (grad_base, grad_x, None if grad_A is None else grad_A.to(a_dtype),
                None if grad_B is None else grad_B.to(b_dtype), None, None)


def gated_lora(base: torch.Tensor, x: torch.Tensor, weight_A: torch.Tensor, weight_B: torch.Tensor,
               gate: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``base + ((x Aᵀ) ⊙ e) Bᵀ`` with e = gate · scaling; shapes base (..., out), x (..., in), A (R, in),
    B (out, R), gate (R,) or per example (B, R)."""
    return GatedLoRA.apply(base, x, weight_A, weight_B, gate, scaling)


def _fast_forward(layer, x, *args, **kwargs):
    """LoraLayer.forward with the fused adapter branch where it computes the same function, PEFT's forward else."""
    state = layer._matryoshka_state
    name = state.adapter_name
    dropout = layer.lora_dropout[name]
    usable = (
        state.fused and not kwargs and not layer.disable_adapters and not layer.merged
        and list(layer.active_adapters) == [name] and name not in layer.lora_variant
        and (not layer.training or isinstance(dropout, torch.nn.Identity) or dropout.p == 0)
    )
    if not usable:
        return layer._reference_forward(x, *args, **kwargs)
    result = layer.base_layer(x, *args)
    lora_B = layer.lora_B[name]
    return gated_lora(result, x, layer.lora_A[name].weight, lora_B.weight, getattr(lora_B, GATE), layer.scaling[name])


def install(layer) -> None:
    """Route ``layer.forward`` through the fused path (keeping PEFT's forward as ``_reference_forward``)."""
    layer._reference_forward = layer.forward
    layer.forward = types.MethodType(_fast_forward, layer)
