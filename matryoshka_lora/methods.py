"""The training methods: one record each, and the only place that says what a method is.

Every method trains the same nested adapter ``y = W0 x + B (g ⊙ A x)``; methods differ in four things:

    gate        the training gate g (R,), from the config and this step's draw
    draw        what is drawn once per optimizer step (DyLoRA's rank k, sandwich's ranks), or nothing
    stacked     the (ranks, λ) of a multi-rank loss over a batch stacked across ranks, or None: the model's
                own loss through the training gate
    prefix      whether the run trains one function W0 + B(g ⊙ Ax) whose rank-k truncation ``inference:
                prefix`` can read (then g is that function's gate at rank R)

With P = Σ_{r∈S} λ_r s_r 1[:r] (Algorithm 1), s_r the rank scale and λ_r the config's weights:

    matryoshka        g = P                          the paper's method
    dylora            g = s_k 1[:k], k ~ U(choices)  one rank per step
    lora              g = s_R 1                      plain LoRA
    lora-svd          g = s_R 1                      plain LoRA, whose final adapter is re-factored by SVD
                                                     (``svd.py``): rank k is ΔW's best rank-k approximation
    matryoshka-exact  Σ_{r∈S} λ_r ℓ(rank r)           the multi-rank objective itself, stacked
    sandwich          Σ_{r∈D} λ ℓ(rank r)             D = {min S, max S} ∪ sandwich_n drawn from the rest
    distill           λ ℓ(R) + Σ_{r∈D, r<R} λ KL(p_R ‖ p_r)   sandwich's draw; the smaller ranks learn rank R's
                                                     detached distribution (in-place distillation, [1])
    dylora-distill    λ ℓ(R) + λ KL(p_R ‖ p_k)        one drawn rank k, stacked with R (two passes of work)
    dylora-frozen     dylora's gate and draw; only the slice new at k (rows j of A, columns j of B with
                      k' < j <= k, k' the next smaller rank drawn from) is trained that step: the DyLoRA
                      paper's update [2] (ours trains the whole prefix 1..k)

``dylora_probs`` replaces the uniform draw of the dylora methods by given probabilities.

[1] Yu & Huang, "Universally Slimmable Networks and Improved Training Techniques", ICCV 2019 (the sandwich rule
    and in-place distillation); Cai et al., "Once-for-All", ICLR 2020.
[2] Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
    Adaptation", EACL 2023 (its "frozen" mode).

Adding a method: one ``Method`` in ``METHODS`` (and its row in the tests' method table).
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ranks import rank_gate, uniform_weights


@dataclass(frozen=True)
class Method:
    """What one training method does; the functions take the ``MatryoshkaConfig`` and this step's draw."""

    name: str
    about: str  # one line for --help
    gate: Callable  # (config, drawn) -> training gate (R,)
    draw: Callable | None = None  # (config, generator) -> this step's draw; None: nothing is drawn
    stacked: Callable | None = None  # (config, drawn) -> (ranks, λ) of the stacked loss; None: the model's loss
    prefix: bool = False  # trains one function that inference "prefix" truncates
    plain: bool = False  # trains plain rank-R LoRA: merging in training mode merges rank R; svd can nest it
    distill: bool = False  # stacked ranks below R learn rank R's detached distribution (KL), R the labels
    frozen_prefix: bool = False  # only the slice new at the drawn rank is trained (``frozen_width``)
    svd_at_end: bool = False  # the final adapter is saved re-factored by SVD (scaling "none"), nested that way


def full_rank_gate(config, drawn=None) -> torch.Tensor:
    """s_R · 1: plain LoRA's gate, and the gate of the stacked methods outside their stacked loss."""
    return rank_gate(config.rank, config.rank, config.scaling)


def _drawn_gate(config, k) -> torch.Tensor:
    """s_k · 1[:k] for the drawn k (rank R before a draw)."""
    return rank_gate(config.rank, k or config.rank, config.scaling)


def _draw_one(config, generator) -> int:
    choices = config.dylora_choices()
    if config.dylora_probs is None:  # the uniform draw as it always was: old runs resume with the same ranks
        return choices[int(torch.randint(len(choices), (1,), generator=generator).item())]
    probs = torch.tensor(config.dylora_probs, dtype=torch.float64)
    return choices[int(torch.multinomial(probs, 1, generator=generator).item())]


def _with_teacher(config, k) -> tuple[list[int], list[float]]:
    """Rank k (the draw; R before one) stacked with R, the teacher."""
    ranks = sorted({k or config.rank, config.rank})
    return ranks, uniform_weights(len(ranks), config.p_normalize)


def frozen_width(config, k: int | None) -> int:
    """How many leading slices a step at rank k leaves untrained (``frozen_prefix``): those of the next smaller
    rank drawn from (0 at the smallest, and before a draw)."""
    return max((c for c in config.dylora_choices() if c < k), default=0) if k else 0


def _draw_sandwich(config, generator) -> list[int]:
    S = config.train_ranks
    middle = S[1:-1]
    n = min(config.sandwich_n, len(middle))
    picked = torch.randperm(len(middle), generator=generator)[:n].tolist()
    return sorted({S[0], S[-1], *(middle[i] for i in picked)})


def _sandwich_objective(config, drawn) -> tuple[list[int], list[float]]:
    ranks = drawn or sorted({config.train_ranks[0], config.rank})
    return ranks, uniform_weights(len(ranks), config.p_normalize)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("matryoshka", "the paper: all nested ranks at once through the gate P", gate=lambda c, _: c.p(),
           prefix=True),
    Method("dylora", "one rank k per optimizer step, drawn from the train ranks (the default of MatryoshkaConfig: "
           "the best objective that trains nested ranks, in docs/results.md)", gate=_drawn_gate, draw=_draw_one),
    Method("lora", "plain LoRA at rank R (nested afterwards by `matryoshka-lora svd`)", gate=full_rank_gate,
           prefix=True, plain=True),
    Method("lora-svd", "plain LoRA at rank R, its final adapter re-factored by SVD so that rank k is the best "
           "rank-k approximation of its ΔW (the default of `train`: best at equal compute in docs/results.md)",
           gate=full_rank_gate, prefix=True, plain=True, svd_at_end=True),
    Method("matryoshka-exact", "the multi-rank loss Σ_r λ_r ℓ(rank r) itself, the batch stacked across the "
           "train ranks", gate=full_rank_gate, stacked=lambda c, _: (list(c.train_ranks), c.lambdas())),
    Method("sandwich", "the loss at R, at the smallest rank and at sandwich_n drawn ranks, stacked",
           gate=full_rank_gate, draw=_draw_sandwich, stacked=_sandwich_objective),
    Method("distill", "in-place distillation: rank R on the labels, the smallest rank and sandwich_n drawn ranks "
           "on the KL to rank R's detached output, stacked", gate=full_rank_gate, draw=_draw_sandwich,
           stacked=_sandwich_objective, distill=True),
    Method("dylora-distill", "one drawn rank k per step on the KL to rank R's detached output, R on the labels, "
           "stacked (two passes of work)", gate=full_rank_gate, draw=_draw_one, stacked=_with_teacher,
           distill=True),
    Method("dylora-frozen", "DyLoRA with its paper's update: only the slice new at the drawn rank k is trained",
           gate=_drawn_gate, draw=_draw_one, frozen_prefix=True),
)}
METHOD_NAMES = tuple(METHODS)
PREFIX_METHODS = tuple(name for name, m in METHODS.items() if m.prefix)
# MatryoshkaConfig(): a method whose live model is nested while it trains (use_rank works on it at every step)
DEFAULT_METHOD = "dylora"
# `train` (and so compare and demo): best at equal compute in docs/results.md; nested by the SVD at the final save
TRAIN_DEFAULT_METHOD = "lora-svd"


def method_help() -> str:
    return "; ".join(f"{name} ({m.about})" for name, m in METHODS.items())
