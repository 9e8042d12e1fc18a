"""Per-layer rank profiles from one nested adapter: choose a rank per module under a parameter budget.

Every adapted module m of a nested adapter holds an ordered family of ranks, so a profile {m: k_m} is a choice,
not a retraining. ``allocate`` looks for the profile that minimises the answer-token loss L on a calibration set
subject to  Σ_m k_m · (in_m + out_m) ≤ budget,  each k_m from the grid (the train ranks, or every rank 0..R; 0
switches the module's adapter off):

1. **Score** every option (m, k) with an estimate of ΔL_m(k) = L(m at k, the rest at R) − L(all at R):
   - ``drop`` (default): measured, one profile per option, evaluated in stacked batches (n profiles × the
     calibration batch in one forward, each copy with its own per-layer gates): M·|grid| profiles.
   - ``taylor``: an estimate, ΔL_m(k) ≈ ∇L·δ + ½ δᵀ F δ, δ = g(k) − g(R) the change of the module's gate (its rank-k
     inference gate s_k·1[:k]) and F the empirical Fisher of the per-example gate gradients; one forward and
     backward pass over the calibration set. (The first-order term alone vanishes at a trained adapter.) Much
     cheaper, much rougher: dropping a slice is not a small change, and the refinement has more to fix.
2. **Allocate** under the budget with the additive model Σ_m ΔL_m(k_m): every module starts at 0, and the
   upgrade with the best estimated loss decrease per parameter that still fits is taken, along each module's lower
   convex hull of (parameters, ΔL) (the greedy of the multiple-choice knapsack). If a uniform train rank that fits
   the budget (on every module, or only on the modules whose removal changes the loss at all) has a lower measured
   loss, the search starts from it instead, so a profile is never worse on the calibration set than the best
   uniform rank of at most its size.
3. **Refine** with measured loss (``refine`` rounds): the additive model ignores interactions, so each round
   measures ``candidates`` moves (a module one grid step up or down, or a swap of one step down and another one
   step up, within the budget), ranked by the estimate, and keeps the best if it lowers the measured loss.

Cost in forward passes over the calibration set: 1 forward + 1 backward (``taylor``) or 1 + M·(|grid| − 1)
forwards (``drop``), up to 2|S| for the uniform starts, then 1 + refine·candidates forwards per budget, stacked
``batch_rows`` rows at a time. Everything is deterministic given the calibration set (which the seed draws).
"""
import dataclasses

from .errors import InvalidInput
from .profile_scores import drop_scores, full_params, measure, module_costs, taylor_scores
from .selection import matryoshka_state

SCORES = ("taylor", "drop")
GRIDS = ("train", "all")


@dataclasses.dataclass
class Allocation:
    """A profile and what it cost: {module: rank}, its parameters, its measured calibration loss."""

    profile: dict[str, int]
    params: int
    loss: float
    budget: int
    forward_passes: int


def grid_ranks(config, grid: str) -> list[int]:
    """The ranks a module may take under ``config`` (a MatryoshkaConfig): 0 and the train ranks, or every rank
    0..R."""
    if grid not in GRIDS:
        raise InvalidInput(f"grid={grid!r} is not valid; choose one of {', '.join(GRIDS)}")
    return [0] + (list(config.train_ranks) if grid == "train" else list(range(1, config.rank + 1)))


def hull(costs: list[int], losses: list[float]) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, loss), from the cheapest: each step up buys
    less loss decrease per parameter than the one before, and no kept option is dominated."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], losses[i]))
    kept: list[int] = []
    for i in order:
        if kept and losses[i] >= losses[kept[-1]]:
            continue  # costs more, gains nothing
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]  # drop b when a → i is at least as steep as a → b
            if (losses[a] - losses[b]) * (costs[i] - costs[a]) <= (losses[a] - losses[i]) * (costs[b] - costs[a]):
                kept.pop()
            else:
                break
        kept.append(i)
    return kept


def greedy_profile(scores: dict[str, dict[int, float]], costs: dict[str, int], budget: int) -> dict[str, int]:
    """The multiple-choice-knapsack greedy: every module from its cheapest option up its hull, best estimated loss
    decrease per parameter first, never past ``budget``. Pure and deterministic (ties: module order)."""
    names = list(scores)
    steps, at = {}, {}
    for m in names:
        ks = sorted(scores[m])
        chain = [ks[i] for i in hull([k * costs[m] for k in ks], [scores[m][k] for k in ks])]
        steps[m], at[m] = chain, 0
    profile = {m: steps[m][0] for m in names}
    used = sum(profile[m] * costs[m] for m in names)
    while True:
        best = None
        for i, m in enumerate(names):
            if at[m] + 1 >= len(steps[m]):
                continue
            k0, k1 = steps[m][at[m]], steps[m][at[m] + 1]
            extra = (k1 - k0) * costs[m]
            if used + extra > budget:
                continue
            gain = (scores[m][k0] - scores[m][k1]) / extra
            if best is None or gain > best[0]:
                best = (gain, m, k1, extra)
        if best is None:
            return profile
        _, m, k1, extra = best
        profile[m], at[m], used = k1, at[m] + 1, used + extra


def swap_candidates(profile, scores, costs, ranks, budget, n: int) -> list[dict[str, int]]:
    """Up to ``n`` profiles one move away (a module one grid step up or down, or a swap of one step down and another
    one step up), within the budget, best estimated first."""
    used = sum(profile[m] * costs[m] for m in profile)
    down, up = [], []
    for m, k in profile.items():
        i = ranks.index(k)
        if i > 0:
            down.append((scores[m][ranks[i - 1]] - scores[m][k], (k - ranks[i - 1]) * costs[m], m, ranks[i - 1]))
        if i + 1 < len(ranks):
            up.append((scores[m][ranks[i + 1]] - scores[m][k], (ranks[i + 1] - k) * costs[m], m, ranks[i + 1]))
    down.sort(key=lambda d: d[0] / d[1])  # the least loss per freed parameter first
    up.sort(key=lambda u: u[0] / u[1])  # the most loss decrease per parameter first
    moves = [(du, {m: k}) for du, cost, m, k in up if used + cost <= budget] + [(dd, {m: k}) for dd, _, m, k in down]
    for dd, freed, a, ka in down[:2 * n]:
        for du, cost, b, kb in up[:2 * n]:
            if a != b and used - freed + cost <= budget:
                moves.append((dd + du, {a: ka, b: kb}))
    moves.sort(key=lambda x: x[0])
    return [dict(profile, **change) for _, change in moves[:n]]


def uniform_starts(scores: dict[str, dict[int, float]], ranks) -> list[dict[str, int]]:
    """Uniform rank k on every module, and on the modules whose removal changes the loss at all (an adapter that is
    zero, or switched off, does not) with the rest at 0, for each train rank k: where modules were trained together
    at equal ranks, such profiles can beat any additive estimate."""
    useful = [m for m in scores if scores[m].get(0, 0.0) != 0.0]
    out = [dict.fromkeys(scores, k) for k in ranks]
    if 0 < len(useful) < len(scores):
        out += [{m: (k if m in useful else 0) for m in scores} for k in ranks]
    return out


def _params(profile: dict[str, int], costs: dict[str, int]) -> int:
    return sum(k * costs[m] for m, k in profile.items())


def check_budget(budget: int, costs: dict[str, int], ranks: list[int], full: int) -> None:
    """Raises: InvalidInput for a budget no profile can use (below one module at the smallest rank) or above the
    full adapter."""
    smallest = min(c for c in costs.values()) * min(k for k in ranks if k > 0)
    if budget < smallest:
        raise InvalidInput(f"budget {budget:,} parameters is below the smallest profile with an adapter "
                           f"({smallest:,}: one module at rank {min(k for k in ranks if k > 0)}); give at least that")
    if budget > full:
        raise InvalidInput(f"budget {budget:,} parameters is above the full adapter ({full:,}); give a share <= 1 "
                           f"or a count <= {full:,}")


def allocate(model, batches: list[dict], budgets: list[int], grid: str = "train", score: str = "drop",
             refine: int = 3, candidates: int = 8, batch_rows: int = 32) -> list[Allocation]:
    """One profile per budget (parameters), scored once and refined with measured loss; see the module docstring.

    Raises:
        InvalidInput: an unknown grid or score, or a budget outside what profiles can use.
    """
    return search(model, batches, budgets, grid, score, refine, candidates, batch_rows)[0]


def search(model, batches: list[dict], budgets: list[int], grid: str = "train", score: str = "drop",
           refine: int = 3, candidates: int = 8, batch_rows: int = 32) -> tuple[list[Allocation], dict[int, float]]:
    """``allocate``'s profiles, and the calibration loss of every uniform train rank it measured on the way."""
    if score not in SCORES:
        raise InvalidInput(f"score={score!r} is not valid; choose one of {', '.join(SCORES)}")
    ranks, costs, full = grid_ranks(matryoshka_state(model).config, grid), module_costs(model), full_params(model)
    for b in budgets:
        check_budget(b, costs, ranks, full)
    model.eval()
    if score == "taylor":
        scores, passes = taylor_scores(model, batches, ranks), 2
    else:
        scores = drop_scores(model, batches, ranks, batch_rows)
        passes = 1 + sum(len(ranks) - 1 for _ in costs)
    train_ranks = list(matryoshka_state(model).config.train_ranks)
    starts = uniform_starts(scores, train_ranks)  # the uniform ranks on every module come first
    start_losses = measure(model, batches, starts, batch_rows).tolist()
    out = []
    for budget in budgets:
        profile = greedy_profile(scores, costs, budget)
        loss, n = float(measure(model, batches, [profile], batch_rows)[0]), passes + len(starts) + 1
        fitting = [(l, u) for l, u in zip(start_losses, starts) if _params(u, costs) <= budget]
        if fitting and min(fitting, key=lambda x: x[0])[0] < loss:  # never start worse than a uniform rank
            loss, profile = min(fitting, key=lambda x: x[0])
        for _ in range(refine):
            tried = swap_candidates(profile, scores, costs, ranks, budget, candidates)
            if not tried:
                break
            losses = measure(model, batches, tried, batch_rows).tolist()
            n += len(tried)
            if min(losses) >= loss:
                break
            # the fewest parameters among the (numerically) best: a zero-effect module rides along for free
            best = min(range(len(tried)), key=lambda i: (round(losses[i], 6), _params(tried[i], costs)))
            profile, loss = tried[best], losses[best]
        out.append(Allocation(profile, _params(profile, costs), loss, budget, n))
    return out, dict(zip(train_ranks, start_losses))
