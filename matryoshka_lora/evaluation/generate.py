"""Batched greedy generation and log-likelihood scoring at several ranks of one matryoshka model.

Stacked mode runs every requested rank in one pass: a batch of b prompts is repeated once per
rank, rank-major, into a (K·b, T) batch and ``set_rank(model, LongTensor)`` gives each row its
own rank, so K ranks cost one decode loop instead of K. Sequential mode runs one rank at a time
over the same batches. Rank 0 means the base model with the adapter switched off (the
"pretrained" baseline); it always runs as its own pass, through PEFT's ``disable_adapter``.

Why both give the same outputs: both modes see exactly the same prompt batches (same order, same
left padding, same position ids), the per-example gate ``h * g[b]`` of row b is bit-identical to
the single-rank gate, and rows never interact in a transformer (padding is masked). What remains
is whether a kernel's result for one row depends on how many rows it runs with. For fp32 on CPU
with ``eager`` attention the logits are bitwise equal (tests/test_generate.py checks the
greedy outputs); CPU SDPA differs in the last bit (its blocking depends on the batch) and GPU
GEMMs pick kernels by shape, so there the guarantee weakens to "equal unless two logits tie
within rounding". ``evaluate.py`` therefore defaults to eager attention.

We use ``model.generate`` (greedy, KV cache, left padding, its position ids from the attention
mask) rather than our own loop: it handles every architecture's cache and position scheme, and a
per-row stopping criterion gives the stop strings and the early exit when every row stopped.
"""
import contextlib

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..errors import InvalidInput
from ..selection import use_rank
from .extract import truncate_at_stop

PRETRAINED = 0  # the rank that means "base model, adapter off"


def rank_passes(ranks, stacked: bool) -> list[list[int]]:
    """How ``ranks`` are grouped into passes: rank 0 alone; the others together (stacked) or one by one."""
    adapter_ranks = [k for k in ranks if k != PRETRAINED]
    passes = [[PRETRAINED]] if PRETRAINED in ranks else []
    if stacked and adapter_ranks:
        passes.append(adapter_ranks)
    else:
        passes += [[k] for k in adapter_ranks]
    return passes


@contextlib.contextmanager
def at_ranks(model, group: list[int], batch: int):
    """Run the next forwards of a (len(group)·batch)-row batch with row block i at rank group[i]."""
    if group == [PRETRAINED]:
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with ctx:
            yield
    elif len(group) == 1:
        with use_rank(model, group[0]):
            yield
    else:
        per_row = torch.tensor(group, dtype=torch.long).repeat_interleave(batch)  # (K·b,) rank-major
        with use_rank(model, per_row):
            yield


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own special-token default, as lm-eval's HFLM."""
    return tokenizer(text)["input_ids"]


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ids (B, T) and attention mask (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


class StopOnStrings(StoppingCriteria):
    """Per-row stop once the generated text holds a stop string (checked on the decoded tail)."""

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_len = prompt_len
        # a stop string spans at most this many tokens; decode a little more for merges at the border
        self.tail = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in self.stop), default=0) + 2

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done
        tails = self.tokenizer.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.tail):])
        for i, text in enumerate(tails):
            done[i] = any(s in text for s in self.stop)
        return done


def prompt_ids(tokenizer, prompts: list[str], max_new_tokens: int, max_length: int | None) -> list[list[int]]:
    """The token ids generation starts from: each prompt encoded, cut on the left to leave room for the answer."""
    seqs = [encode(tokenizer, p) for p in prompts]
    if max_length is not None:
        keep = max(1, max_length - max_new_tokens)
        seqs = [s[-keep:] for s in seqs]
    return seqs


def _generate_batch(model, tokenizer, seqs, group, max_new_tokens, stop) -> list[list[str]]:
    """Greedy completions of one prompt batch at every rank of ``group``: [rank index][row] -> text."""
    pad = pad_id_of(tokenizer)
    ids, mask = pad_left(seqs, pad)  # (b, T)
    K, b = len(group), len(seqs)
    ids, mask = ids.repeat(K, 1), mask.repeat(K, 1)  # (K·b, T), rank-major
    device = _device(model)
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    if eos is None:
        eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=eos)
    criteria = StoppingCriteriaList([StopOnStrings(tokenizer, list(stop), ids.shape[1])])
    with torch.no_grad(), at_ranks(model, group, b):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config, stopping_criteria=criteria)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:].cpu(), skip_special_tokens=True)
    texts = [truncate_at_stop(t, stop) for t in texts]
    return [texts[i * b:(i + 1) * b] for i in range(K)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def generate_at_ranks(model, tokenizer, prompts: list[str], ranks, batch_size: int = 8,
                      max_new_tokens: int = 256, stacked: bool = True, stop=(), max_length: int | None = None,
                      progress: bool = True) -> dict[int, list[str]]:
    """Greedy completions of ``prompts`` at each rank, cut at the first stop string.

    Args:
        model: a matryoshka PEFT model (or a plain model with ``ranks=[0]``).
        tokenizer: its tokenizer; prompts are encoded with its default special tokens.
        prompts: the prompt texts.
        ranks: ranks to run; 0 is the base model with the adapter off.
        batch_size: prompts per batch (a stacked batch has ``batch_size × ranks`` rows).
        max_new_tokens: generation budget per prompt.
        stacked: run all adapter ranks in one pass (True) or one rank after another (False).
        stop: stop strings; a row stops once its text holds one, and the text is cut there.
        max_length: longest prompt + generation in tokens; longer prompts lose tokens on the left.
        progress: show a tqdm bar.

    Returns:
        ``{rank: [completion per prompt]}`` in prompt order.

    Raises:
        ValueError: a rank outside 0..R.
    """
    stop = list(stop)
    seqs = prompt_ids(tokenizer, prompts, max_new_tokens, max_length)
    # longest first, as lm-eval: similar lengths share a batch (less padding) and memory errors come early
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    def run(items, group):
        return _generate_batch(model, tokenizer, items, group, max_new_tokens, stop)

    return _over_passes(seqs, order, ranks, stacked, batch_size, run, "generate", "prompt", progress)


def _over_passes(items, order, ranks, stacked, batch_size, run_batch, verb, unit, progress) -> dict:
    """{rank: [result per item]}: ``run_batch(batch items, group of ranks)`` over every pass and batch."""
    out = {k: [None] * len(items) for k in ranks}
    passes = rank_passes(ranks, stacked)
    bar = tqdm(total=len(items) * len(passes), desc=f"{verb} ranks {','.join(map(str, ranks))}",
               disable=not progress, unit=unit)
    for group in passes:
        for batch in _batches(order, batch_size):
            results = run_batch([items[i] for i in batch], group)
            for k, block in zip(group, results):
                for i, r in zip(batch, block):
                    out[k][i] = r
            bar.update(len(batch))
    bar.close()
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces move to the continuation; tokens split off the whole."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each pair as scored: the context cut on the left to fit ``max_length``.

    Raises:
        InvalidInput: a continuation with no tokens.
    """
    encoded = []
    for context, continuation in pairs:
        c, t = encode_pair(tokenizer, context, continuation)
        if not t:
            raise InvalidInput(f"continuation {continuation!r} after context {context[-40:]!r} has no tokens")
        if max_length is not None and len(c) + len(t) > max_length + 1:
            c = c[max(0, len(c) + len(t) - max_length - 1):]
        if not c:  # lm-eval scores a bare continuation after the EOS/BOS prefix token
            c = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        encoded.append((c, t))
    return encoded


def _score_batch(model, pairs, group, pad) -> list[list[tuple[float, int, int]]]:
    """(sum log p, n tokens, n greedy-correct tokens) of each continuation at each rank of ``group``."""
    seqs = [(c + t)[:-1] for c, t in pairs]  # the model predicts token j+1 from tokens ..j
    targets = [t for _, t in pairs]
    ids, mask = pad_left(seqs, pad)  # (b, T)
    K, b = len(group), len(pairs)
    ids, mask = ids.repeat(K, 1), mask.repeat(K, 1)  # (K·b, T)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() does for left padding
    keep = max(len(t) for t in targets)  # every continuation ends at the last position
    device = _device(model)
    with torch.no_grad(), at_ranks(model, group, b):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), logits_to_keep=keep).logits  # (K·b, keep, V)
    logits = logits[:, -keep:].float()
    out = [[] for _ in group]
    for r in range(K * b):
        t = torch.tensor(targets[r % b], device=logits.device)  # (C,)
        row = logits[r, keep - len(t):]  # (C, V)
        logp = torch.log_softmax(row, dim=-1).gather(-1, t[:, None])[:, 0]  # (C,)
        greedy = int((row.argmax(-1) == t).sum())
        out[r // b].append((float(logp.sum()), len(t), greedy))
    return out


def score_at_ranks(model, tokenizer, pairs: list[tuple[str, str]], ranks, batch_size: int = 8,
                   stacked: bool = True, max_length: int | None = None,
                   progress: bool = True) -> dict[int, list[tuple[float, int, int]]]:
    """Teacher-forced log-likelihood of each (context, continuation) pair at each rank.

    Args:
        pairs: (context, continuation) texts, split into tokens as lm-eval does.
        ranks, batch_size, stacked, progress: as ``generate_at_ranks``.
        max_length: longest scored sequence in tokens; longer ones lose context tokens on the left.

    Returns:
        ``{rank: [(sum of log p over continuation tokens, number of tokens, tokens where greedy
        decoding would have picked the target)]}`` in pair order.

    Raises:
        ValueError: an empty continuation, or a rank outside 0..R.
    """
    encoded = encode_pairs(tokenizer, pairs, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    pad = pad_id_of(tokenizer)
    def run(items, group):
        return _score_batch(model, items, group, pad)

    return _over_passes(encoded, order, ranks, stacked, batch_size, run, "score", "seq", progress)


__all__ = ["generate_at_ranks", "score_at_ranks", "rank_passes", "encode_pair", "encode_pairs", "prompt_ids", "PRETRAINED"]
