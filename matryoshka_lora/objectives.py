"""The multi-rank objective Σ_r λ_r ℓ(W0 + s_r A_r B_r) in one forward/backward pass (``distill`` methods: ℓ at
the largest rank, KL to its detached distribution at the others).

The batch is stacked across the ranks, (|S|·B, T), with one per-example rank per copy, so the cost is one pass
over |S| times the tokens instead of |S| passes.
"""
import torch
import torch.nn.functional as F

from .errors import InvalidInput
from .selection import matryoshka_state, step_objective, use_rank
from .ranks import uniform_weights


def multi_rank_losses(model, input_ids, labels, attention_mask=None, ranks=None, weights=None,
                      num_items_in_batch=None, position_ids=None):
    """(Σ_r λ_r ℓ_r, tensor of the |S| per-rank losses ℓ_r), each ℓ_r the causal-LM loss at rank r.

    Args:
        model: a matryoshka model.
        input_ids: (B, T) token ids.
        labels: (B, T) targets, -100 where no loss is taken (shifted inside, as transformers does).
        attention_mask: (B, T) or None.
        ranks: the ranks r (default: the step's ranks for stacked methods, else the train ranks).
        weights: λ_r, one per rank (default: the config's λ for the train ranks, else 1 each, or 1/|ranks| with
            ``p_normalize``).
        num_items_in_batch: the answer tokens of the whole optimizer step (as the transformers Trainer passes
            with gradient accumulation); default: those of this batch, so ℓ_r is the usual token mean.
        position_ids: (B, T) or None; packed rows restart them per example (``features.PackedCollator``).
    """
    config = matryoshka_state(model).config
    if ranks is None:
        ranks, default_weights = step_objective(model) if config.method_record.stacked \
            else (list(config.train_ranks), config.lambdas())
        weights = default_weights if weights is None else weights
    ranks = [int(r) for r in ranks]
    if weights is None:
        weights = uniform_weights(len(ranks), config.p_normalize)
    if len(weights) != len(ranks):
        raise InvalidInput(f"{len(weights)} weights for {len(ranks)} ranks; give one weight per rank")
    n, B = len(ranks), input_ids.shape[0]
    ids = input_ids.repeat(n, 1)  # (n·B, T), rank-major
    mask = attention_mask.repeat(n, 1) if attention_mask is not None else None
    positions = position_ids.repeat(n, 1) if position_ids is not None else None
    per_example = torch.tensor(ranks, device=input_ids.device).repeat_interleave(B)  # (n·B,)
    with use_rank(model, per_example):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits  # (n·B, T, V)
    target = labels[:, 1:]  # (B, T-1)
    if config.method_record.distill and n > 1:
        token_loss = distilled(logits.view(n, B, *logits.shape[1:])[:, :, :-1], target, ranks.index(max(ranks)))
    else:
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.repeat(n, 1).flatten(),
                                     ignore_index=-100, reduction="none").view(n, B, -1)  # (n, B, T-1)
    count = (target != -100).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    per_rank = token_loss.sum(dim=(1, 2)) / count  # (n,)
    w = torch.tensor(weights, dtype=per_rank.dtype, device=per_rank.device)
    return (w * per_rank).sum(), per_rank.detach()


def multi_rank_loss(model, input_ids, labels, attention_mask=None, ranks=None, weights=None,
                    num_items_in_batch=None, position_ids=None):
    """Σ_r λ_r ℓ(W0 + s_r A_r B_r) in one stacked pass; see ``multi_rank_losses``."""
    return multi_rank_losses(model, input_ids, labels, attention_mask, ranks, weights, num_items_in_batch,
                             position_ids)[0]


def distilled(logits, target, teacher: int):
    """In-place distillation: the teacher's copy (the largest rank) scored on the labels, every other copy by
    KL(p_teacher ‖ p_copy) with the teacher's distribution detached, on the answer tokens, so the smaller ranks
    learn what rank R predicts while R alone learns the labels.

    Args:
        logits: (n, B, T-1, V) the stacked copies' next-token logits.
        target: (B, T-1) the next tokens, -100 off the answer.
        teacher: the index of the teacher's copy.

    Returns:
        (n, B, T-1) the loss per token (0 off the answer).
    """
    mask = target != -100  # (B, T-1)
    log_p = F.log_softmax(logits[:, mask].float(), dim=-1)  # (n, M, V), M answer tokens
    reference = log_p[teacher].detach()  # (M, V)
    out = torch.zeros(logits.shape[:3], dtype=log_p.dtype, device=log_p.device)
    out[:, mask] = (reference.exp() * (reference - log_p)).sum(-1)  # (n, M)
    out[teacher] = F.cross_entropy(logits[teacher].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                   reduction="none").view_as(target)
    return out
