"""The `lora-svd` baseline: a trained adapter re-factored so that its rank-k prefix is the best rank-k ΔW.

For ΔW = s·BA (rank <= R), with B = Q_b R_b and Aᵀ = Q_a R_a (thin QR) and R_b R_aᵀ = U' Σ V'ᵀ:

    B' = Q_b U' (sΣ)^½          (out, R)
    A' = (sΣ)^½ V'ᵀ Q_aᵀ        (R, in)

so B'A' = ΔW and B'[:, :k] A'[:k] is its truncated SVD (Eckart–Young). Saved with scaling "none" (s_k = 1),
the result is an ordinary nested adapter: ``use_rank(k)`` and ``export_rank(k)`` give the rank-k truncation.
"""
import dataclasses
import json
import os

import torch
from safetensors.torch import save_file

from .adapter_io import ADAPTER_CONFIG_NAME, WEIGHTS_NAME, _atomic_dir, _json_ready, _source
from .errors import InvalidInput


def svd_factors(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B'A' = scale·BA and singular values in decreasing order along the rank axis.

    Args:
        A: (R, in) ``lora_A`` weight.
        B: (out, R) ``lora_B`` weight.
        scale: s, the factor PEFT applies to BA.
    """
    A64, B64 = A.double(), B.double()
    Qb, Rb = torch.linalg.qr(B64)  # (out, R), (R, R)
    Qa, Ra = torch.linalg.qr(A64.T)  # (in, R), (R, R)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # (R, R), (R,), (R, R)
    root = (scale * S).sqrt()  # (R,)
    B_new = (Qb @ U) * root[None, :]
    A_new = root[:, None] * (Vh @ Qa.T)
    return A_new.to(A.dtype), B_new.to(B.dtype)


def svd_adapter(model_or_dir, out_dir) -> str:
    """Write the SVD re-factoring of a trained adapter as a nested adapter folder (scaling "none").

    The adapter's training gate must be uniform (method "lora"), since ΔW is then s_R·BA.

    Raises:
        ValueError: the adapter was trained with another method.
    """
    config, peft_config, weights = _source(model_or_dir)
    if config.method != "lora":
        raise InvalidInput(f"lora-svd needs an adapter trained with method 'lora', not {config.method!r}")
    scale = config.scale_max
    out = {}
    for key, A in weights.items():
        if "lora_A" not in key:
            if "lora_B" not in key:
                out[key] = A
            continue
        B = weights[key.replace("lora_A", "lora_B")]
        out[key], out[key.replace("lora_A", "lora_B")] = (t.contiguous() for t in svd_factors(A, B, scale))
    new_config = dataclasses.replace(config, scaling="none", inference="paper")
    peft_config = dict(peft_config, lora_alpha=config.rank)  # alpha / r = 1 = s_R of scaling "none"
    with _atomic_dir(out_dir) as tmp:
        save_file(out, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(_json_ready(peft_config), f, indent=2)
        new_config.save(tmp)
    return os.fspath(out_dir)

