"""`matryoshka-lora svd`: a trained plain LoRA adapter re-factored so that its rank-k prefix is the best rank-k ΔW.

For ΔW = s·BA (rank <= R), with B = Q_b R_b and Aᵀ = Q_a R_a (thin QR) and R_b R_aᵀ = U' Σ V'ᵀ:

    B' = Q_b U' (sΣ)^½          (out, R)
    A' = (sΣ)^½ V'ᵀ Q_aᵀ        (R, in)

so B'A' = ΔW and B'[:, :k] A'[:k] is its truncated SVD (Eckart–Young). Saved with scaling "none" (s_k = 1),
the result is an ordinary nested adapter: ``use_rank(k)`` and ``export_rank(k)`` give the rank-k truncation.
The source is a run of this library trained with ``method: lora`` or any PEFT LoRA adapter folder (e.g. from
TRL or a PEFT script): nested ranks for an adapter that was never trained for them (`lora-svd` in compare).
"""
import dataclasses
import math
import os
import shutil

import torch

from .adapter_io import read_adapter, read_json, read_weights, write_adapter_dir
from .config import MatryoshkaConfig
from .errors import InvalidInput
from .files import atomic_dir, file_digest, write_json
from .methods import METHODS
from .rundir import ADAPTER_CONFIG, ADAPTER_FILES, MATRYOSHKA_CONFIG, SVD_SOURCE, WEIGHTS

# LoraConfig fields of a PEFT adapter carried over as they are (they choose layers, not the adapter's math)
CARRIED_PEFT_FIELDS = {"layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
                       "exclude_modules": None, "fan_in_fan_out": False, "bias": "none"}


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


def peft_lora_source(directory: str) -> tuple[MatryoshkaConfig, dict, dict, float]:
    """(config, PEFT adapter config, weights, s) of a stock PEFT LoRA adapter folder, whose ΔW = s·BA with
    s = lora_alpha / r (lora_alpha / √r with rsLoRA).

    Raises:
        InvalidInput: not a LoRA adapter, or one whose ΔW is not one rank-r product per layer (DoRA, a LoRA
            bias, per-module ranks or alphas, embedding or parameter LoRA), every problem listed.
    """
    peft_config = read_json(os.path.join(directory, ADAPTER_CONFIG))
    weights = read_weights(directory)
    r, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    problems = []
    if peft_config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {peft_config.get('peft_type')!r}, not 'LORA'")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r={r!r} is not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.append(f"lora_alpha={alpha!r} is not a positive number")
    for name in ("use_dora", "lora_bias"):
        if peft_config.get(name):
            problems.append(f"{name} is set: its ΔW is not B·A alone")
    for name in ("rank_pattern", "alpha_pattern", "target_parameters"):
        if peft_config.get(name):
            problems.append(f"{name} is not empty: every layer must have rank r and scale lora_alpha / r")
    parts = {next(p for p in k.split(".") if p.startswith("lora_")) for k in weights if ".lora_" in k}
    odd = sorted(parts - {"lora_A", "lora_B"})
    if odd:
        problems.append(f"it holds {', '.join(odd)} weights (only linear-layer lora_A/lora_B can be re-factored)")
    if problems:
        raise InvalidInput(f"{directory} cannot be re-factored: " + "; ".join(problems))
    kwargs = {k: peft_config[k] for k, default in CARRIED_PEFT_FIELDS.items() if peft_config.get(k, default) != default}
    config = MatryoshkaConfig(rank=r, method="lora", scaling="none", target_modules=peft_config["target_modules"],
                              lora_dropout=peft_config.get("lora_dropout") or 0.0, lora_kwargs=kwargs)
    scale = alpha / (math.sqrt(r) if peft_config.get("use_rslora") else r)
    return config, peft_config, weights, scale


def svd_adapter(model_or_dir, out_dir, train_ranks: list[int] | None = None, keep_run_files: bool = False) -> str:
    """Write the SVD re-factoring of a trained adapter as a nested adapter folder (scaling "none").

    Args:
        model_or_dir: a matryoshka model or adapter folder trained with method "lora", or a stock PEFT LoRA
            adapter folder (no ``matryoshka_config.json``).
        out_dir: the folder to write (written beside it, then renamed into place).
        train_ranks: the ranks the new adapter lists as its own (the default ranks of eval and export);
            default: the source's, or powers of two up to r for a PEFT adapter.
        keep_run_files: also copy the source folder's other files (train config, tokenizer, ...), so that a
            training run's re-factoring is a run folder ``eval`` and ``export --merge`` take like the run.

    Raises:
        ValueError: the adapter was trained with another method, or cannot be re-factored.
    """
    is_peft = isinstance(model_or_dir, (str, os.PathLike)) and not os.path.isfile(
        os.path.join(model_or_dir, MATRYOSHKA_CONFIG))
    if is_peft:
        config, peft_config, weights, scale = peft_lora_source(os.fspath(model_or_dir))
    else:
        config, peft_config, weights = read_adapter(model_or_dir)
        scale = config.scale_max
    if not config.method_record.plain:
        plain = " or ".join(repr(name) for name, m in METHODS.items() if m.plain)
        raise InvalidInput(f"lora-svd needs an adapter trained with method {plain}, not {config.method!r}, whose "
                           "ranks are nested already: evaluate or export it as it is")
    out = {}
    for key, A in weights.items():
        if "lora_A" not in key:
            if "lora_B" not in key:
                out[key] = A
            continue
        B = weights[key.replace("lora_A", "lora_B")]
        out[key], out[key.replace("lora_A", "lora_B")] = (t.contiguous() for t in svd_factors(A, B, scale))
    new_config = dataclasses.replace(config, scaling="none", inference="paper",
                                     train_ranks=train_ranks or (None if is_peft else config.train_ranks))
    # alpha / r = 1 = s_R of scaling "none"; rsLoRA would turn it into alpha / sqrt(r)
    peft_config = dict(peft_config, lora_alpha=config.rank, use_rslora=False)
    from_folder = isinstance(model_or_dir, (str, os.PathLike))
    with atomic_dir(out_dir) as tmp:
        write_adapter_dir(tmp, out, peft_config, new_config)
        if keep_run_files and from_folder:
            for name in os.listdir(model_or_dir):
                src = os.path.join(model_or_dir, name)
                if os.path.isfile(src) and name not in ADAPTER_FILES and not name.startswith("."):
                    shutil.copy2(src, os.path.join(tmp, name))
        # the mark of a nested adapter (rundir.warn_if_not_nested), and which plain adapter it came from
        source = file_digest(os.path.join(model_or_dir, WEIGHTS)) if from_folder else None
        write_json(os.path.join(tmp, SVD_SOURCE), {"lora_adapter_sha256": source})
    return os.fspath(out_dir)


def nest_in_place(directory: str) -> None:
    """Replace the plain LoRA adapter in ``directory`` by its SVD re-factoring (``method: lora-svd`` does this to
    its final adapter, in the final save's temp folder, so the run folder only ever holds the nested one)."""
    nested = os.path.join(directory, ".svd")
    svd_adapter(directory, nested)
    for name in os.listdir(nested):
        os.replace(os.path.join(nested, name), os.path.join(directory, name))
    os.rmdir(nested)


def energy_captured(weights: dict, ranks: list[int]) -> list[float]:
    """Per rank k, the share of ‖ΔW‖²_F that the first k components keep, averaged over the layers.

    For SVD-ordered factors the i-th component of a layer is σ_i u_i v_iᵀ with σ_i = ‖B[:, i]‖·‖A[i]‖, so
    this is Σ_{i<=k} σ_i² / Σ_i σ_i², the squared relative error of rank k subtracted from 1.
    """
    shares = []
    for key, A in weights.items():
        if ".lora_A." not in key:
            continue
        B = weights[key.replace(".lora_A.", ".lora_B.")]
        sigma2 = (B.double().norm(dim=0) * A.double().norm(dim=1)).square()  # (R,)
        total = sigma2.sum().item()
        if total > 0:
            shares.append([sigma2[:k].sum().item() / total for k in ranks])
    return [sum(s[i] for s in shares) / len(shares) if shares else 0.0 for i in range(len(ranks))]
