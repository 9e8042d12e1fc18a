"""Appendix-B variants: λ-weighted P, prefix inference, the exact multi-rank loss and the sandwich rule."""
import pytest
import torch
from peft import PeftModel

from matryoshka_lora import (MatryoshkaConfig, export_rank, multi_rank_loss, multi_rank_losses, p_vector,
                             sample_rank, step_objective, use_rank)
from conftest import VOCAB, tiny_model, tokens, wrapped


def test_normalised_and_general_weights():
    c = MatryoshkaConfig(rank=8, scaling="sqrt", p_normalize=True)
    torch.testing.assert_close(c.p(), p_vector(8, [1, 2, 4, 8], "sqrt") / 4)
    c = MatryoshkaConfig(rank=8, train_ranks=[8, 2], weights=[0.75, 0.25])  # paired with ranks, then sorted
    assert c.train_ranks == [2, 8] and c.weights == [0.25, 0.75]
    assert c.p().tolist() == [1.0, 1.0] + [0.75] * 6
    assert MatryoshkaConfig(rank=8).lambdas() == [1.0] * 4  # Algorithm 1


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": [1, 2]}, "weights has 2 entries but there are 4 train ranks"),
    ({"weights": [1, -1, 1, 1]}, "non-negative"),
    ({"weights": [0, 0, 0, 0]}, "not all zero"),
    ({"method": "dylora", "inference": "prefix"}, "inference='prefix' needs method matryoshka or lora"),
    ({"inference": "suffix"}, "inference='suffix'"),
    ({"method": "sandwich", "sandwich_n": -1}, "sandwich_n=-1"),
    ({"dylora_probs": [0.5, 0.5]}, r"dylora_probs has 2 entries but DyLoRA draws from 4 ranks \(dylora_ranks='train'\)"),
    ({"dylora_probs": [1] * 4, "dylora_ranks": "all"}, "DyLoRA draws from 8 ranks"),
    ({"dylora_probs": [1, -1, 1, 1]}, r"dylora_probs=\[1, -1, 1, 1\] is not valid; give one non-negative"),
    ({"dylora_probs": [0, 0, 0, 0]}, "not all zero"),
])
def test_bad_objective_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MatryoshkaConfig(rank=8, **kwargs)


def test_read_as_another_inference_rule():
    c = MatryoshkaConfig(rank=8, scaling="sqrt", weights=[4, 3, 2, 1], method="matryoshka")
    assert c.read_as(None) is c and c.read_as("paper") is c
    prefix = c.read_as("prefix")
    assert prefix.inference == "prefix" and c.inference == "paper"
    assert {k: v for k, v in vars(prefix).items() if k != "inference"} == \
        {k: v for k, v in vars(c).items() if k != "inference"}
    with pytest.raises(ValueError, match="inference='prefix' needs method matryoshka or lora"):
        MatryoshkaConfig(rank=8, method="dylora").read_as("prefix")
    with pytest.raises(ValueError, match="inference='suffix' is not valid; choose one of paper, prefix"):
        c.read_as("suffix")


@pytest.mark.parametrize("scaling", ["none", "sqrt"])
def test_prefix_inference_truncates_the_trained_function(tmp_path, scaling):
    model = wrapped(scaling=scaling, inference="prefix")
    layer = model.matryoshka.layers["model.layers.0.mlp.up_proj"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    P = p_vector(8, [1, 2, 4, 8], scaling)
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        trained = layer(x)
        for k in (1, 3, 8):
            with use_rank(model, k):
                got = layer(x)
            want = layer.get_base_layer()(x) + (x @ A[:k].T * P[:k]) @ B[:, :k].T
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with use_rank(model, 8):
            torch.testing.assert_close(layer(x), trained, atol=1e-6, rtol=1e-6)  # rank R is the training forward
    ids = tokens()
    export_rank(model, 3, tmp_path / "r3")  # P[:3] folded into B
    stock = PeftModel.from_pretrained(tiny_model(vocab_size=VOCAB), tmp_path / "r3").eval()
    with use_rank(model, 3), torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def batch_with_padding():
    ids = tokens(batch=3, length=9, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens
    labels[mask == 0] = -100
    return ids, mask, labels


@pytest.mark.parametrize("scaling", ["none", "rank"])
def test_multi_rank_loss_equals_weighted_per_rank_losses(scaling):
    ids, mask, labels = batch_with_padding()
    model = wrapped(method="matryoshka-exact", scaling=scaling, weights=[0.1, 0.2, 0.3, 0.4])
    model.train()
    total, per_rank = multi_rank_losses(model, ids, labels, mask)
    total.backward()
    stacked_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    one_by_one = 0
    for r, w in zip([1, 2, 4, 8], [0.1, 0.2, 0.3, 0.4]):
        with use_rank(model, r):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert per_rank[[1, 2, 4, 8].index(r)].item() == pytest.approx(loss.item(), rel=1e-5)
        one_by_one = one_by_one + w * loss
    one_by_one.backward()
    torch.testing.assert_close(total, one_by_one, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(stacked_grads[n], p.grad, atol=1e-5, rtol=1e-4)
    assert model.matryoshka.setting is None  # the per-example ranks were only for the stacked pass


def test_multi_rank_loss_explicit_ranks_and_weights():
    ids, mask, labels = batch_with_padding()
    model = wrapped()
    with torch.no_grad():
        got = multi_rank_loss(model, ids, labels, mask, ranks=[2, 8], weights=[1.0, 3.0])
        want = 0
        for r, w in ((2, 1.0), (8, 3.0)):
            with use_rank(model, r):
                want += w * model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="2 weights for 1 ranks"):
        multi_rank_loss(model, ids, labels, mask, ranks=[2], weights=[1.0, 2.0])


def test_sandwich_draws_smallest_largest_and_n_between():
    model = wrapped(method="sandwich", train_ranks=[1, 2, 4, 8, 16, 32], rank=32, sandwich_n=2, p_normalize=True,
                    target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # k, v: 16 wide
    g = torch.Generator().manual_seed(0)
    draws = [sample_rank(model, g) for _ in range(30)]
    assert all(d[0] == 1 and d[-1] == 32 and len(d) == 4 for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    ranks, weights = step_objective(model)
    assert ranks == draws[-1] and weights == [0.25] * 4
    g2 = torch.Generator().manual_seed(0)
    assert draws == [sample_rank(model, g2) for _ in range(30)]


def test_step_objective_refuses_single_function_methods():
    with pytest.raises(ValueError, match="step_objective is for"):
        step_objective(wrapped(method="lora"))
