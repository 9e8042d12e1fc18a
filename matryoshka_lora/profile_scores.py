"""Losses of rank profiles in stacked batches, and the per-option scores the allocation starts from.

A batch is repeated once per profile, (n·B, T), and every adapted layer gets a per-example gate (n·B, R) whose row
block j is profile j's gate for that layer, so n profiles cost one forward of n·B rows (see ``allocate.py``).
"""
import contextlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .fused import GATE
from .selection import apply_gates, layer_gate, matryoshka_state, set_fused


def module_costs(model) -> dict[str, int]:
    """{module: in + out}: the parameters one rank of its adapter holds."""
    return {name: layer.in_features + layer.out_features for name, layer in matryoshka_state(model).layers.items()}


def full_params(model) -> int:
    return matryoshka_state(model).config.rank * sum(module_costs(model).values())


def _gate(config, k: int) -> torch.Tensor:
    """The stored gate of rank k (divided by s_R, which PEFT multiplies back); rank 0: the adapter off."""
    return layer_gate(config, k) / config.scale_max


@contextlib.contextmanager
def stacked_profiles(model, profiles: list[dict[str, int]], rows: int):
    """Within the block, row block j (``rows`` rows) of a batch of len(profiles)·rows rows runs at profile j."""
    state = matryoshka_state(model)
    c = state.config
    cache = {}
    try:
        for name, layer in state.layers.items():
            lora_B = layer.lora_B[state.adapter_name]
            gates = [cache.setdefault(p[name], _gate(c, p[name])) for p in profiles]
            per_row = torch.stack(gates).repeat_interleave(rows, dim=0)  # (n·rows, R)
            setattr(lora_B, GATE, per_row.to(lora_B.weight.device))
        yield model
    finally:
        apply_gates(state)


def answer_losses(model, batch: dict, profiles: list[dict[str, int]]) -> torch.Tensor:
    """(n,) summed answer-token cross-entropy of ``batch`` at each profile, in one stacked forward."""
    with stacked_profiles(model, profiles, batch["input_ids"].shape[0]):
        return _summed(model, batch, len(profiles))[0]


def _summed(model, batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) summed answer-token cross-entropy and (n,) correct answer tokens (greedy, teacher-forced) of ``batch``
    repeated n times, with the gates as they are set.

    Only the logits of answer positions are computed (the head on those hidden states), so n copies of a long
    vocabulary stay cheap."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows = ids.shape[0]
    base = model.get_base_model()
    hidden = base.base_model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1),
                             use_cache=False).last_hidden_state  # (n·B, T, H)
    target = labels[:, 1:].repeat(n, 1)  # (n·B, T-1)
    keep = target != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])  # (N answer tokens, V)
    token_loss = F.cross_entropy(logits.float(), target[keep], reduction="none")
    owner = torch.arange(n, device=ids.device).repeat_interleave(rows)[:, None].expand_as(target)[keep]
    correct = (logits.argmax(-1) == target[keep]).float()
    zeros = torch.zeros(n, device=ids.device)
    return zeros.index_add(0, owner, token_loss), zeros.index_add(0, owner, correct)


def answer_scores(model, batches: list[dict], profiles: list[dict[str, int]],
                  batch_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean answer-token loss, answer-token accuracy), each (len(profiles),), over ``batches``, stacked
    ``batch_rows`` rows a pass."""
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    loss, correct = torch.zeros(len(profiles)), torch.zeros(len(profiles))
    passes = []  # (batch, first profile, profiles in the pass)
    for b in batches:
        per_pass = max(1, batch_rows // b["input_ids"].shape[0])
        passes += [(b, i, min(per_pass, len(profiles) - i)) for i in range(0, len(profiles), per_pass)]
    bar = tqdm(total=len(passes), desc=f"{len(profiles)} profiles", unit="pass", leave=False,
               disable=len(passes) < 8 or None)  # None: only on a terminal
    with torch.no_grad(), bar:
        for b, i, n in passes:
            with stacked_profiles(model, profiles[i:i + n], b["input_ids"].shape[0]):
                l, c = _summed(model, b, n)
            loss[i:i + n] += l.cpu()
            correct[i:i + n] += c.cpu()
            bar.update()
    return loss / max(tokens, 1), correct / max(tokens, 1)


def measure(model, batches: list[dict], profiles: list[dict[str, int]], batch_rows: int) -> torch.Tensor:
    """(len(profiles),) mean answer-token loss over the batches (see ``answer_scores``)."""
    return answer_scores(model, batches, profiles, batch_rows)[0]


def taylor_scores(model, batches: list[dict], ranks: list[int]) -> dict[str, dict[int, float]]:
    """ΔL_m(k) ≈ ∇L·δ + ½ δᵀ H δ with δ = g(k) − g(R), the change of module m's gate, at the full adapter.

    H is the empirical Fisher of the per-example losses with respect to the gate (N_tok Σ_i G_i G_iᵀ, G_i the
    gradient of example i's share of L), read from one backward pass with one gate row per example. The first-order
    term alone is near zero for a trained adapter (A and B at a stationary point make the gate's gradient vanish
    too), which is why the second-order term is there: it is what dropping a slice costs.
    """
    state = matryoshka_state(model)
    c, R = state.config, state.config.rank
    full = _gate(c, R)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    grad = {name: torch.zeros(R, dtype=torch.float64) for name in state.layers}
    fisher = {name: torch.zeros(R, R, dtype=torch.float64) for name in state.layers}
    set_fused(model, False)  # the reference path multiplies by the gate in autograd; the fused one does not
    try:
        for b in batches:
            rows = b["input_ids"].shape[0]
            gates = {name: full.expand(rows, R).clone().to(layer.lora_B[state.adapter_name].weight.device)
                     .requires_grad_(True) for name, layer in state.layers.items()}  # (B, R): one row per example
            for name, layer in state.layers.items():
                setattr(layer.lora_B[state.adapter_name], GATE, gates[name])
            loss = _summed(model, b, 1)[0][0] / tokens
            for name, g in zip(gates, torch.autograd.grad(loss, list(gates.values()))):
                g = g.detach().cpu().double()  # (B, R)
                grad[name] += g.sum(0)
                fisher[name] += tokens * g.T @ g
    finally:
        set_fused(model, True)
        apply_gates(state)
    deltas = {k: (_gate(c, k) - full).double() for k in ranks}
    return {name: {k: float(grad[name] @ d + 0.5 * d @ fisher[name] @ d) for k, d in deltas.items()}
            for name in state.layers}


def drop_scores(model, batches, ranks: list[int], batch_rows: int) -> dict[str, dict[int, float]]:
    """Measured ΔL_m(k): the loss with module m alone at rank k, minus the full adapter's."""
    R = matryoshka_state(model).config.rank
    names = list(matryoshka_state(model).layers)
    full = dict.fromkeys(names, R)
    options = [(m, k) for m in names for k in ranks if k != R]
    losses = measure(model, batches, [full] + [dict(full, **{m: k}) for m, k in options], batch_rows)
    scores = {m: {R: 0.0} for m in names}
    for (m, k), loss in zip(options, losses[1:].tolist()):
        scores[m][k] = loss - float(losses[0])
    return scores
