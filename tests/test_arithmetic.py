"""The built-in arithmetic generator: deterministic, disjoint splits, correct answers."""
import re

import pytest

from matryoshka_lora.arithmetic import answer_number, make_split, split_of


def test_same_seed_same_problems_other_seed_other_problems():
    assert make_split("train", 50, seed=3) == make_split("train", 50, seed=3)
    assert make_split("train", 50, seed=3) != make_split("train", 50, seed=4)


def test_prefix_stable_when_asking_for_more():
    assert make_split("test", 100, seed=1)[:40] == make_split("test", 40, seed=1)


def test_splits_are_disjoint_across_seeds():
    train = {p["question"] for s in (0, 1) for p in make_split("train", 1000, seed=s)}
    test = {p["question"] for s in (0, 1) for p in make_split("test", 300, seed=s)}
    assert not train & test
    assert all(split_of(q) == "test" for q in test)


def test_no_duplicates_within_a_split():
    qs = [p["question"] for p in make_split("train", 2000, seed=0)]
    assert len(set(qs)) == len(qs)


def _check_steps(answer: str) -> None:
    """Every `a op b (op c) = r` in the worked solution is right, and the last result is the final answer."""
    results = []
    for expr, result in re.findall(r"((?:\d+ [-+*/] )+\d+) = (\d+)", answer):
        assert eval(expr) == int(result), (expr, result, answer)  # only digits and + - * / from the regex
        results.append(int(result))
    assert results, answer
    assert results[-1] == answer_number(answer)


def test_answers_are_correct_and_end_with_the_number():
    for split in ("train", "test"):
        for p in make_split(split, 500, seed=7):
            assert re.search(r"\n#### -?\d+$", p["answer"]), p["answer"]
            assert answer_number(p["answer"]) >= 0
            _check_steps(p["answer"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="split='dev'"):
        make_split("dev", 5)
    with pytest.raises(ValueError, match="n=0"):
        make_split("train", 0)
