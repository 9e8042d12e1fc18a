"""Pure rank math: the P vector (Algorithm 1), rank schedules, gates and AURAC.

Nothing here holds module state, so every function is trivial to test by hand.
A *gate* is the length-R vector g placed between ``lora_A`` and ``lora_B``:
``y = W0 x + B (g ⊙ A x)``. Training and inference only differ in which gate is used.
"""
import math
from collections.abc import Sequence

import torch

from .errors import InvalidInput

SCALINGS = ("none", "rank", "sqrt")


def rank_scale(r: int, scaling: str = "none") -> float:
    """The adapter scale s_r of the paper: 1, 1/r or 1/sqrt(r)."""
    if scaling not in SCALINGS:
        raise InvalidInput(f"scaling={scaling!r} is not valid; choose one of {', '.join(SCALINGS)}")
    if r < 1:
        raise InvalidInput(f"rank {r} is not valid; ranks are integers >= 1")
    if scaling == "none":
        return 1.0
    if scaling == "rank":
        return 1.0 / r
    return 1.0 / math.sqrt(r)


def default_train_ranks(rank: int) -> list[int]:
    """Powers of two up to ``rank``, plus ``rank`` itself if it is not one: 12 -> [1, 2, 4, 8, 12]."""
    check_rank(rank)
    ranks = [1 << i for i in range(rank.bit_length()) if (1 << i) <= rank]
    if ranks[-1] != rank:
        ranks.append(rank)
    return ranks


def check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidInput(f"rank={rank!r} is not valid; the rank must be an integer >= 1")


def check_train_ranks(rank: int, train_ranks: Sequence[int]) -> list[str]:
    """Every problem with ``train_ranks`` for maximum rank ``rank``, as messages (empty when valid)."""
    problems = []
    ranks = list(train_ranks)
    if not ranks:
        problems.append("train_ranks is empty; give at least one rank in 1..rank")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= rank]
    if bad:
        problems.append(f"train_ranks {bad} outside 1..{rank} (the maximum rank)")
    repeated = sorted({r for r in ranks if ranks.count(r) > 1 and r not in bad})
    if repeated:
        problems.append(f"train_ranks {repeated} repeated; each rank may appear once")
    return problems


def uniform_weights(n: int, normalize: bool) -> list[float]:
    """λ_r for n ranks: 1 each (Algorithm 1), or 1/n each (Appendix B's normalised weights)."""
    return [1.0 / n if normalize else 1.0] * n


def p_vector(rank: int, train_ranks: Sequence[int], scaling: str = "none", weights=None) -> torch.Tensor:
    """Algorithm 1: ``P_i = sum over r in S with r >= i of w_r * s_r``, shape (rank,).

    ``weights`` (w_r, default 1 for every r, as the paper's Algorithm 1) gives the
    multi-rank objective's lambda_r of Appendix B.

    Example: ``p_vector(8, [1, 2, 4, 8])`` is ``[4, 3, 2, 2, 1, 1, 1, 1]``.
    """
    check_rank(rank)
    problems = check_train_ranks(rank, train_ranks)
    if problems:
        raise InvalidInput("; ".join(problems))
    if weights is None:
        weights = [1.0] * len(train_ranks)
    if len(weights) != len(train_ranks):
        raise InvalidInput(f"weights has {len(weights)} entries but train_ranks has {len(train_ranks)}")
    p = torch.zeros(rank, dtype=torch.float64)
    for r, w in zip(train_ranks, weights):
        p[:r] += w * rank_scale(r, scaling)
    return p.float()


def rank_gate(rank: int, k: int, scaling: str = "none") -> torch.Tensor:
    """The gate of rank-k inference: ``s_k * [1]*k + [0]*(rank-k)``, shape (rank,)."""
    check_inference_rank(rank, k)
    g = torch.zeros(rank)
    g[:k] = rank_scale(k, scaling)
    return g


def batch_gate(rank: int, ks: torch.Tensor, scaling: str = "none") -> torch.Tensor:
    """One rank-k gate per example: ``ks`` (B,) -> (B, rank)."""
    ks = ks.detach().to("cpu", torch.long).reshape(-1)
    for k in ks.unique().tolist():
        check_inference_rank(rank, k)
    scale = torch.tensor([rank_scale(k, scaling) for k in ks.tolist()])  # (B,)
    mask = torch.arange(rank)[None, :] < ks[:, None]  # (B, R)
    return mask.float() * scale[:, None]


def check_inference_rank(rank: int, k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rank:
        raise InvalidInput(f"inference rank {k!r} is not valid; choose an integer in 1..{rank}")


def _trapezoid(xs: Sequence[float], values: Sequence[float]) -> float:
    area = sum((values[i] + values[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def _check_curve(ranks: Sequence[int], values: Sequence[float]) -> None:
    if len(ranks) != len(values) or not ranks:
        raise InvalidInput(f"need one value per rank and at least one rank; got {len(ranks)} ranks, {len(values)} values")
    if any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise InvalidInput(f"ranks {list(ranks)} must be strictly increasing")
    if ranks[0] < 1:
        raise InvalidInput(f"ranks {list(ranks)} must be >= 1")


def aurac(ranks: Sequence[int], values: Sequence[float]) -> float:
    """Eq. 14: trapezoid area under the rank-accuracy curve over the rank span (one rank: its value)."""
    _check_curve(ranks, values)
    if len(ranks) == 1:
        return float(values[0])
    return _trapezoid([float(r) for r in ranks], values)


def log_aurac(ranks: Sequence[int], values: Sequence[float]) -> float:
    """Eq. 15: as ``aurac`` with log2 rank on the x axis."""
    _check_curve(ranks, values)
    if len(ranks) == 1:
        return float(values[0])
    return _trapezoid([math.log2(r) for r in ranks], values)
