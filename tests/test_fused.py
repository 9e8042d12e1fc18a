"""The fused adapter branch (fused.py) computes PEFT's function: values and gradients, every setting."""
import copy

import pytest
import torch

from conftest import tiny_model
from matryoshka_lora import (MatryoshkaConfig, get_matryoshka_model, multi_rank_loss, sample_rank, set_fused,
                             set_rank, use_rank)
from matryoshka_lora.fused import gated_lora

VOCAB = 128


def randomize_(model, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    state = model.matryoshka
    with torch.no_grad():
        for layer in state.layers.values():
            for w in (layer.lora_A[state.adapter_name].weight, layer.lora_B[state.adapter_name].weight):
                w.copy_(torch.randn(w.shape, generator=g) * scale)
    return model


def pair(kind="llama", dtype=torch.float32, scale=0.5, **cfg):
    """The same model twice: one on the fused path, one on PEFT's reference path."""
    cfg.setdefault("rank", 8)
    cfg.setdefault("method", "matryoshka")
    model = get_matryoshka_model(tiny_model(kind, VOCAB).to(dtype), MatryoshkaConfig(**cfg))
    fused = randomize_(model, scale=scale)
    reference = copy.deepcopy(fused)
    set_fused(reference, False)
    return fused, reference


def calls_fused(model, monkeypatch):
    """Count calls of the fused function, so a test can tell which path ran."""
    import matryoshka_lora.fused as f

    calls = []
    original = f.GatedLoRA.apply
    monkeypatch.setattr(f.GatedLoRA, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def tokens(batch=3, length=7, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids, **kw):
    model.zero_grad()
    loss = model(ids, labels=ids, **kw).loss
    loss.backward()
    state = model.matryoshka
    grads = {n: (l.lora_A[state.adapter_name].weight.grad.clone(), l.lora_B[state.adapter_name].weight.grad.clone())
             for n, l in state.layers.items()}
    return loss.detach(), grads


def assert_same(fused, reference, ids, atol=1e-5, **kw):
    loss_f, grads_f = loss_and_grads(fused, ids, **kw)
    loss_r, grads_r = loss_and_grads(reference, ids, **kw)
    torch.testing.assert_close(loss_f, loss_r, atol=atol, rtol=atol)
    for name in grads_r:
        for got, want in zip(grads_f[name], grads_r[name]):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=atol, rtol=atol)


# --- the function itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("gate_shape", ["shared", "per_example"])
def test_gradcheck(gate_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    base = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(8, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    e = torch.rand(8 if gate_shape == "shared" else (3, 8), dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(gated_lora, (base, x, A, B, e, 0.7))
    want = base + ((x @ A.t()) * 0.7 * (e if e.dim() == 1 else e[:, None, :])) @ B.t()
    torch.testing.assert_close(gated_lora(base, x, A, B, e, 0.7), want)


def test_per_example_gate_of_wrong_batch_is_refused():
    x, base = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="batch of 4"):
        gated_lora(base, x, torch.randn(8, 6), torch.randn(5, 8), torch.ones(4, 8))


# --- whole models: fused == reference ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method,scaling", [("matryoshka", "none"), ("matryoshka", "sqrt"), ("lora", "rank"),
                                            ("dylora", "sqrt"), ("matryoshka-exact", "rank")])
def test_training_step_matches_reference(kind, method, scaling, monkeypatch):
    fused, reference = pair(kind, method=method, scaling=scaling)
    fused.train(), reference.train()
    calls = calls_fused(fused, monkeypatch)
    for model in (fused, reference):
        sample_rank(model, torch.Generator().manual_seed(5))  # the same DyLoRA draw in both
    assert_same(fused, reference, tokens())
    assert calls, "the fused path did not run"


@pytest.mark.parametrize("setting", [1, 3, 8, {"mlp": 2, "self_attn": 5}, torch.tensor([1, 8, 4])])
def test_inference_settings_match_reference(setting):
    fused, reference = pair(scaling="sqrt")
    ids = tokens()
    with use_rank(fused, setting), use_rank(reference, setting):
        assert_same(fused, reference, ids)


def test_multi_rank_loss_matches_reference():
    fused, reference = pair(method="matryoshka-exact", scaling="sqrt")
    ids = tokens()
    losses = []
    for model in (fused, reference):
        model.zero_grad()
        loss = multi_rank_loss(model, ids, ids)
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    for got, want in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def relative_error(grads, gold):
    num = sum(((g.double() - w) ** 2).sum() for k in gold for g, w in zip(grads[k], gold[k]))
    return (num / sum((w ** 2).sum() for k in gold for w in gold[k])).sqrt().item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["bf16 base", "fp32 base under bf16 autocast"])
def test_bf16_within_bf16_tolerance(mode, seed, monkeypatch):
    """Against an fp64 copy: the fused path (bf16 compute) is about as close as PEFT's (adapter in fp32)."""
    dtype = torch.bfloat16 if mode == "bf16 base" else torch.float32
    fused, reference = pair(dtype=dtype, scaling="sqrt", scale=0.05)  # adapter sized as after training
    gold = copy.deepcopy(reference).to(torch.float64)
    calls = calls_fused(fused, monkeypatch)
    layer = next(iter(fused.matryoshka.layers.values()))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    ids = tokens(seed=seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "bf16 base"):
        (loss_f, grads_f), (_, grads_r) = loss_and_grads(fused, ids), loss_and_grads(reference, ids)
    loss_g, grads_g = loss_and_grads(gold, ids)
    assert calls
    assert all(g.dtype == torch.float32 for k in grads_f for g in grads_f[k])
    assert abs(loss_f.double() - loss_g) < 5e-3
    err_f, err_r = relative_error(grads_f, grads_g), relative_error(grads_r, grads_g)
    assert err_f < 0.03 and err_f < 3 * err_r, (err_f, err_r)


def test_gradient_checkpointing_matches_reference():
    fused, reference = pair(scaling="rank")
    for model in (fused, reference):
        model.train()
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(fused, reference, tokens())


def test_input_gradients_flow_through_the_fused_path():
    fused, reference = pair(dtype=torch.float64, scaling="sqrt")
    grads = []
    for model in (fused, reference):
        embeds = model.get_input_embeddings()(tokens()).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.sum().backward()
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)


# --- where the reference path must run ---------------------------------------------------------------

def test_dropout_in_training_uses_reference_path(monkeypatch):
    fused, reference = pair(lora_dropout=0.3)
    fused.train(), reference.train()
    calls = calls_fused(fused, monkeypatch)
    ids = tokens()
    torch.manual_seed(0)
    got = fused(ids).logits
    torch.manual_seed(0)
    want = reference(ids).logits
    assert not calls
    torch.testing.assert_close(got, want)
    fused.eval()
    fused(ids)
    assert calls  # dropout is the identity in eval mode: fused again


def test_merged_and_disabled_adapters_use_reference_path(monkeypatch):
    fused, reference = pair(scaling="sqrt")
    calls = calls_fused(fused, monkeypatch)
    ids = tokens()
    with torch.no_grad():
        with fused.disable_adapter():
            plain = fused(ids).logits
        set_rank(fused, 4)
        fused.merge_adapter()
        merged = fused(ids).logits
        fused.unmerge_adapter()
        with use_rank(reference, 4):
            want = reference(ids).logits
    assert not calls
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, want)  # the adapter matters, so the merged comparison can fail


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["matryoshka", "dylora", "lora"])
def test_cuda_bf16_training_step_within_bf16_tolerance(method):
    fused, reference = pair(dtype=torch.bfloat16, method=method, scaling="sqrt", scale=0.05)
    fused.cuda(), reference.cuda()
    gold = copy.deepcopy(reference).to(torch.float64)
    ids = tokens().cuda()
    for model in (fused, reference, gold):
        sample_rank(model, torch.Generator().manual_seed(5))
    (loss_f, grads_f), (_, grads_r), (loss_g, grads_g) = (loss_and_grads(m, ids) for m in (fused, reference, gold))
    assert abs(loss_f.double() - loss_g) < 5e-3
    err_f, err_r = relative_error(grads_f, grads_g), relative_error(grads_r, grads_g)
    assert err_f < 0.03 and err_f < 3 * err_r, (err_f, err_r)
