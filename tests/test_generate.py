"""Stacked generation and scoring at several ranks equal one rank at a time, and both equal plain forwards."""
import pytest
import torch
from transformers import AutoTokenizer

from conftest import tiny_model
from test_evaluate import MARGIN, at_rank, teacher_forced
from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, use_rank
from matryoshka_lora.evaluation.generate import (PRETRAINED, encode_pair, generate_at_ranks, pad_left, rank_passes,
                                      score_at_ranks)


pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = [PRETRAINED, 1, 2, 4, 8]
PROMPTS = [f"Question: Tom has {i} apples and buys {2 * i + 1} more. How many?\nAnswer:" + " Let us see." * (i % 3)
           for i in range(7)]




@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture(scope="module")
def model():
    base = tiny_model("llama", vocab_size=49152, seed=1)
    base.set_attn_implementation("eager")
    peft_model = get_matryoshka_model(base, MatryoshkaConfig(rank=8, method="matryoshka"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return peft_model.eval()


def test_rank_passes():
    assert rank_passes([0, 1, 2, 4], stacked=True) == [[0], [1, 2, 4]]
    assert rank_passes([0, 1, 2, 4], stacked=False) == [[0], [1], [2], [4]]
    assert rank_passes([4], stacked=True) == [[4]]


def test_pad_left():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stacked_generation_equals_sequential(model, tokenizer):
    kwargs = dict(batch_size=3, max_new_tokens=12, stop=["Question:"], progress=False)
    stacked = generate_at_ranks(model, tokenizer, PROMPTS, RANKS, stacked=True, **kwargs)
    sequential = generate_at_ranks(model, tokenizer, PROMPTS, RANKS, stacked=False, **kwargs)
    assert stacked == sequential
    # the ranks really differ (lora_B is not zero), so equality is not trivial
    assert len({tuple(stacked[k]) for k in RANKS}) == len(RANKS)


def _greedy_alone(model, tokenizer, prompt, n):
    """Unbatched, unpadded greedy decoding without a cache: the reference for one prompt."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return tokenizer.decode(out, skip_special_tokens=True)


def test_batched_generation_matches_unbatched_decoding(model, tokenizer):
    got = generate_at_ranks(model, tokenizer, PROMPTS[:4], [PRETRAINED, 2, 8], batch_size=4, max_new_tokens=6,
                            progress=False)
    for k in (2, 8):
        with use_rank(model, k):
            assert got[k] == [_greedy_alone(model, tokenizer, p, 6) for p in PROMPTS[:4]]
    with model.disable_adapter():
        assert got[PRETRAINED] == [_greedy_alone(model, tokenizer, p, 6) for p in PROMPTS[:4]]


def test_stop_strings_cut_and_stop_early(model, tokenizer):
    free = generate_at_ranks(model, tokenizer, PROMPTS[:2], [4], batch_size=2, max_new_tokens=16, progress=False)[4]
    # stop at a word each completion produces early: its first three characters
    stops = [t[1:4] for t in free]
    calls = []
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        cut = generate_at_ranks(model, tokenizer, PROMPTS[:2], [4], batch_size=2, max_new_tokens=16, stop=stops,
                                progress=False)[4]
    finally:
        hook.remove()
    for text, full in zip(cut, free):
        expected = full
        for s in stops:
            expected = expected.split(s)[0]
        assert text == expected
    assert len(calls) < 16  # every row stopped, so decoding ended before the budget


def test_stacked_scores_equal_sequential_and_plain_forward(model, tokenizer):
    pairs = [(p, " 7 apples.") for p in PROMPTS] + [("Answer: ", "12")]
    stacked = score_at_ranks(model, tokenizer, pairs, RANKS, batch_size=3, stacked=True, progress=False)
    sequential = score_at_ranks(model, tokenizer, pairs, RANKS, batch_size=3, stacked=False, progress=False)
    assert stacked == sequential
    for k in (1, 8):
        context, target = encode_pair(tokenizer, *pairs[2])
        with torch.no_grad(), use_rank(model, k):
            logits = model(input_ids=torch.tensor([context + target])).logits[0]  # (T, V)
        logp = torch.log_softmax(logits[len(context) - 1:-1], -1).gather(-1, torch.tensor(target)[:, None])
        assert stacked[k][2][0] == pytest.approx(float(logp.sum()), abs=1e-4)
        assert stacked[k][2][1] == len(target)
        assert stacked[k][2][2] == int((logits[len(context) - 1:-1].argmax(-1) == torch.tensor(target)).sum())


def test_greedy_hits_are_the_argmax_of_a_plain_forward(model, tokenizer):
    """score_at_ranks' third number, the greedy-hit count behind token_acc, is at every rank the number of
    continuation tokens that the argmax of a plain, unbatched forward picks. Each continuation is the model's own
    greedy output at one rank, so the counts are not 0 there, and they differ by rank.

    Fails if _score_batch counts the argmax one position off, or (stacked) counts a row's hits on the logits of the
    same prompt at the next rank."""
    own_rank = [1, 2, 4, 8, 2, 1, 4]
    pairs = []
    for prompt, k in zip(PROMPTS, own_rank):
        with at_rank(model, k):
            pairs.append((prompt, _greedy_alone(model, tokenizer, prompt, 5)))
    stacked = score_at_ranks(model, tokenizer, pairs, RANKS, batch_size=3, stacked=True, progress=False)
    assert score_at_ranks(model, tokenizer, pairs, RANKS, batch_size=3, stacked=False, progress=False) == stacked
    for k in RANKS:
        expected = [teacher_forced(model, tokenizer, context, continuation, k) for context, continuation in pairs]
        assert min(gap for _, _, gap in expected) > MARGIN  # no argmax that rounding could flip
        assert [(n, hits) for _, n, hits in stacked[k]] == [(n, hits) for hits, n, _ in expected], k
    for i, k in enumerate(own_rank):  # a greedy continuation, re-tokenized, is mostly the model's own choice again
        assert stacked[k][i][2] > 0 and stacked[k][i][2] >= max(stacked[j][i][2] for j in RANKS)
    assert len({tuple(s[2] for s in stacked[k]) for k in RANKS}) == len(RANKS)


def test_encode_pair_moves_trailing_space(tokenizer):
    context, target = encode_pair(tokenizer, "Answer: ", "12")
    assert tokenizer.decode(context) == "Answer:"
    assert tokenizer.decode(target) == " 12"


def test_per_example_ranks_are_restored(model, tokenizer):
    state = model.matryoshka
    before = state.setting
    generate_at_ranks(model, tokenizer, PROMPTS[:2], [1, 2], batch_size=2, max_new_tokens=2, progress=False)
    assert state.setting is before
