"""Packing (`packing: true`): a packed row computes, per example, exactly what that example computes alone.

Deliberate breaks these tests catch: position ids not restarting per example (the collator's arange over the whole
row), an attention_mask passed with packed rows (transformers then ignores the boundaries), the first token of an
example left labelled (it is then predicted from the previous example), and the stacked loss dropping
position_ids.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, wrapped
from matryoshka_lora import cli
from matryoshka_lora.features import PackedCollator, pack_features, packing_problem
from matryoshka_lora.objectives import multi_rank_losses


def examples(n=7, seed=0):
    """Token sequences of varied lengths, labels on their second half (as a prompt/completion example)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 19, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        half = length // 2
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return out


def token_losses(logits, labels):
    """(B, T-1) cross-entropy of each next-token prediction, 0 where unlabelled."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="none").view(labels.shape[0], -1)


def label_count(feats):
    return sum(sum(t != -100 for t in f["labels"][1:]) for f in feats)


def per_example_unpacked(model, feats):
    """Each example alone: (its loss sum, gradients of the token-mean loss of all of them, as the Trainer takes)."""
    model.zero_grad()
    sums, count = [], label_count(feats)
    for f in feats:
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        loss = token_losses(model(input_ids=ids).logits, labels).sum()
        (loss / count).backward()
        sums.append(loss.detach())
    return torch.stack(sums), grads(model)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def split_by_example(per_token, blocks):
    """Per-example sums of a packed batch's (B, T-1) token losses, in the order the examples were packed."""
    out = []
    for row, b in zip(per_token, blocks):
        start = 0
        for n in b["lengths"]:
            out.append(row[max(start - 1, 0):start + n - 1].sum())  # position t predicts token t+1
            start += n
    return out


def packed_order(feats, blocks):
    """Which example each packed slot holds (examples are distinct sequences)."""
    index = {tuple(f["input_ids"]): i for i, f in enumerate(feats)}
    order, = [[]]
    for b in blocks:
        start = 0
        for n in b["lengths"]:
            order.append(index[tuple(b["input_ids"][start:start + n])])
            start += n
    return order


@pytest.mark.parametrize("method", ["matryoshka", "dylora", "lora"])
def test_packed_losses_and_gradients_equal_unpacked(method, one_thread):
    model = wrapped(method=method, seed=3).train()  # use_cache=False below, as training sets: a cache turns the
    # packed-sequence masking off
    feats = examples()
    expected, expected_grads = per_example_unpacked(model, feats)
    blocks, stats = pack_features(feats, max_length=32)
    assert stats["blocks"] < len(feats)  # several examples share a row
    batch = PackedCollator(pad_token_id=0)(blocks)
    assert "attention_mask" not in batch
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    per_token = token_losses(logits, batch["labels"])
    (per_token.sum() / label_count(feats)).backward()
    got = torch.stack(split_by_example(per_token, blocks))
    order = packed_order(feats, blocks)
    torch.testing.assert_close(got, expected[order], rtol=1e-5, atol=1e-5)
    got_grads = grads(model)
    assert got_grads.keys() == expected_grads.keys() and expected_grads
    for name, g in expected_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_stacked_loss_on_packed_rows_equals_unpacked(one_thread):
    model = wrapped(method="matryoshka-exact", seed=4).train()
    feats = examples(n=6, seed=1)
    blocks, _ = pack_features(feats, max_length=40)
    batch = PackedCollator(pad_token_id=0)(blocks)
    ranks, weights = [1, 4, 8], [0.5, 0.3, 0.2]
    packed, per_rank = multi_rank_losses(model, batch["input_ids"], batch["labels"], ranks=ranks, weights=weights,
                                         position_ids=batch["position_ids"])
    # unpacked: the examples right-padded in one batch, with an attention mask, and their first token unlabelled
    # as packing does (nothing predicts a row's first token anyway)
    width = max(len(f["input_ids"]) for f in feats)
    ids = torch.zeros(len(feats), width, dtype=torch.long)
    labels = torch.full((len(feats), width), -100)
    mask = torch.zeros(len(feats), width, dtype=torch.long)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    unpacked, unpacked_per_rank = multi_rank_losses(model, ids, labels, mask, ranks=ranks, weights=weights)
    torch.testing.assert_close(per_rank, unpacked_per_rank, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-6)


def test_packing_fills_rows_and_keeps_every_token():
    feats = examples(n=40, seed=2)
    blocks, stats = pack_features(feats, max_length=24)
    assert all(len(b["input_ids"]) <= 24 and sum(b["lengths"]) == len(b["input_ids"]) for b in blocks)
    assert sorted(packed_order(feats, blocks)) == list(range(40))  # every example exactly once
    assert sum(len(b["input_ids"]) for b in blocks) == sum(len(f["input_ids"]) for f in feats)
    # best-fit decreasing needs few rows: no more than the token total allows, plus a little slack
    lower = -(-sum(len(f["input_ids"]) for f in feats) // 24)
    assert lower <= stats["blocks"] <= lower + 2 and stats["fill"] > 0.9
    assert pack_features(feats, 24)[0] == blocks  # deterministic


def test_collator_restarts_positions_per_example_and_labels_no_first_token():
    feats = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    blocks, _ = pack_features(feats, max_length=8)
    (block,) = blocks
    batch = PackedCollator(pad_token_id=0)([block, {"input_ids": [1], "labels": [-100], "lengths": [1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100] * 5]
    assert batch["token_count"].tolist() == [5, 1]


def test_attention_without_packed_masking_is_refused():
    model = wrapped().base_model.model
    assert packing_problem(model) is None  # sdpa
    model.config._attn_implementation = "flash_attention_2"
    assert "attn_implementation='flash_attention_2'" in packing_problem(model)


def test_train_with_packing(tiny_llama_dir, tmp_path, capsys):
    out = str(tmp_path / "packed")
    rc = cli.main(["train", "--model", tiny_llama_dir, "--max_examples", "24", "--batch_size", "2",
                   "--max_length", "512", "--max_steps", "-1", "--num_train_epochs", "1", "--logging_steps", "1", "--save_steps", "0",
                   "--packing", "true", "--output_dir", out])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "packing: 24 examples in" in printed
    summary = json.load(open(os.path.join(out, "run_complete.json")))
    blocks = summary["examples"]["blocks"]
    assert blocks < 24
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    # one epoch over the rows: every real token once, and no padding token counted
    assert summary["steps"] == -(-blocks // 2) and log[-1]["tokens"] == summary["examples"]["tokens"]
