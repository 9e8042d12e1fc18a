"""The pure rank math: Algorithm 1, default ranks, gates, AURAC."""
import math
import random

import pytest
import torch

from matryoshka_lora import aurac, default_train_ranks, log_aurac, p_vector
from matryoshka_lora.ranks import batch_gate, rank_gate, rank_scale


def algorithm_1(R, S, scaling):
    """A literal transcription of the paper's Algorithm 1 (1-indexed, S sorted ascending)."""
    S = sorted(S)
    s = [rank_scale(r, scaling) for r in S]
    P = [0.0] * (R + 1)
    c = 0
    for r in range(R, 0, -1):
        if r in S:
            c += 1
        # p_r = sum_{k=|S|-c+1}^{|S|} s_{r_k}: the last c ranks of S, i.e. those >= r
        P[r] = sum(s[len(S) - c:])
    return P[1:]


def test_paper_example():
    assert p_vector(8, [1, 2, 4, 8]).tolist() == [4, 3, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_single_rank_is_lora(scaling):
    R = 16
    assert torch.allclose(p_vector(R, [R], scaling), torch.full((R,), rank_scale(R, scaling)))


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_matches_algorithm_1_on_random_sets(scaling):
    rng = random.Random(0)
    for _ in range(200):
        R = rng.randint(1, 64)
        S = rng.sample(range(1, R + 1), rng.randint(1, min(R, 8)))
        expected = torch.tensor(algorithm_1(R, S, scaling))
        assert torch.allclose(p_vector(R, S, scaling), expected, atol=1e-6), (R, S)


def test_sqrt_scaling_value():
    # s_r = 1/sqrt(r) over S = {1..32}: the first component carries sum_{r=1}^{32} 1/sqrt(r) ≈ 9.79
    assert p_vector(32, list(range(1, 33)), "sqrt")[0].item() == pytest.approx(sum(r ** -0.5 for r in range(1, 33)))


@pytest.mark.parametrize("rank,expected", [(1, [1]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12]), (32, [1, 2, 4, 8, 16, 32])])
def test_default_train_ranks(rank, expected):
    assert default_train_ranks(rank) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_rank(bad):
    with pytest.raises(ValueError, match="rank"):
        default_train_ranks(bad)


@pytest.mark.parametrize("S,match", [([1, 9], r"\[9\] outside 1\.\.8"), ([2, 2, 4], r"\[2\] repeated"), ([], "empty"),
                                     ([0, 4], r"\[0\] outside")])
def test_bad_train_ranks(S, match):
    with pytest.raises(ValueError, match=match):
        p_vector(8, S)


def test_bad_scaling():
    with pytest.raises(ValueError, match="scaling='log'.*none, rank, sqrt"):
        p_vector(8, [8], "log")


def test_rank_gate_and_batch_gate():
    assert rank_gate(4, 2, "rank").tolist() == [0.5, 0.5, 0, 0]
    g = batch_gate(4, torch.tensor([1, 4, 2]), "none")
    assert g.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="inference rank 5.*1..4"):
        batch_gate(4, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="inference rank 0"):
        rank_gate(4, 0)


def test_aurac_by_hand():
    # ranks 1,2,4,8 with values 1,2,3,4: area = (1.5*1 + 2.5*2 + 3.5*4) / 7
    assert aurac([1, 2, 4, 8], [1, 2, 3, 4]) == pytest.approx((1.5 + 5 + 14) / 7)
    # log2 spacing makes every interval weigh 1/3
    assert log_aurac([1, 2, 4, 8], [1, 2, 3, 4]) == pytest.approx((1.5 + 2.5 + 3.5) / 3)
    assert aurac([4], [0.7]) == 0.7 and log_aurac([4], [0.7]) == 0.7


def test_aurac_constant_curve_is_the_constant():
    rng = random.Random(1)
    ranks = sorted(rng.sample(range(1, 100), 6))
    assert aurac(ranks, [0.42] * 6) == pytest.approx(0.42)
    assert log_aurac(ranks, [0.42] * 6) == pytest.approx(0.42)


def test_aurac_paper_weight_of_last_interval():
    # §2.5: with S = {1,2,4,8,16} the interval 8..16 weighs 8/15 of AURAC
    values = [0, 0, 0, 0, 1]
    assert aurac([1, 2, 4, 8, 16], values) == pytest.approx(0.5 * 8 / 15)
    assert log_aurac([1, 2, 4, 8, 16], values) == pytest.approx(0.5 / 4)


@pytest.mark.parametrize("ranks,values", [([2, 1], [0, 0]), ([1, 2], [0]), ([], []), ([0, 2], [1, 1])])
def test_aurac_bad_input(ranks, values):
    with pytest.raises(ValueError):
        aurac(ranks, values)
    assert math.isfinite(aurac([1, 2], [0.1, 0.2]))
