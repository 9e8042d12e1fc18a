"""The gated PEFT model: training forward (Eq. 3/4/7), gradients (Eq. 12/13), ranks, export, refusals."""
import copy
import os
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import VOCAB, randomize_, tiny_config, tiny_model, tokens, wrapped
from matryoshka_lora import (MatryoshkaConfig, export_all_ranks, export_rank, get_matryoshka_model,
                             load_matryoshka_model, p_vector, sample_rank, set_rank, use_rank)
from matryoshka_lora.model import GATE, adapter_shapes
from matryoshka_lora.ranks import rank_scale

KINDS = ["llama", "qwen2"]
SCALINGS = ["none", "rank", "sqrt"]


def lora_weights(layer, adapter="default"):
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (R, in), (out, R)


# --- one layer, by the paper's equations -------------------------------------------------------

def layer_and_input(scaling, S=(1, 2, 4, 8)):
    model = wrapped(rank=8, train_ranks=list(S), scaling=scaling)
    layer = model.matryoshka.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    return model, layer, x


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("S", [(1, 2, 4, 8), (8,), (3, 5, 8), (1, 2, 3, 4, 5, 6, 7, 8)])
def test_training_forward_is_eq3_and_eq4(scaling, S):
    _, layer, x = layer_and_input(scaling, S)
    A, B = lora_weights(layer)
    W0 = layer.get_base_layer()
    y = layer(x)
    # Eq. 3: sum over slices
    eq3 = W0(x) + sum(rank_scale(r, scaling) * x @ A[:r].T @ B[:, :r].T for r in S)
    # Eq. 4: full matrices with binary masks
    eq4 = W0(x)
    for r in S:
        mA = torch.zeros_like(A); mA[:r] = 1
        mB = torch.zeros_like(B); mB[:, :r] = 1
        eq4 = eq4 + rank_scale(r, scaling) * x @ (A * mA).T @ (B * mB).T
    torch.testing.assert_close(y, eq3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, eq4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_gradients_are_eq12_and_eq13(scaling):
    _, layer, x = layer_and_input(scaling)
    A, B = lora_weights(layer)
    P = p_vector(8, [1, 2, 4, 8], scaling)
    upstream = torch.randn(2, 5, layer.out_features, generator=torch.Generator().manual_seed(4))
    (layer(x) * upstream).sum().backward()
    X, D = x.reshape(-1, x.shape[-1]), upstream.reshape(-1, upstream.shape[-1])  # (N, in), (N, out)
    # Eq. 12/13 in PEFT's orientation (A: R x in, B: out x R): ∇A = diag(P) Bᵀ Δᵀ X, ∇B = Δᵀ X Aᵀ diag(P)
    torch.testing.assert_close(A.grad, P[:, None] * (B.T @ D.T @ X), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(B.grad, (D.T @ X @ A.T) * P[None, :], atol=1e-4, rtol=1e-4)
    # and they equal autograd through the explicit Eq. 3 sum
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    eq3 = sum(rank_scale(r, scaling) * x @ A2[:r].T @ B2[:, :r].T for r in (1, 2, 4, 8))
    (eq3 * upstream).sum().backward()
    torch.testing.assert_close(A.grad, A2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(B.grad, B2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_rank_k_is_slicing(scaling):
    model, layer, x = layer_and_input(scaling)
    A, B = lora_weights(layer)
    for k in range(1, 9):
        with use_rank(model, k):
            y = layer(x)
        expected = layer.get_base_layer()(x) + rank_scale(k, scaling) * x @ A[:k].T @ B[:, :k].T
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_lora_and_dylora_training_forward():
    _, layer, x = layer_and_input("rank")
    model = wrapped(rank=8, method="lora", scaling="rank")
    layer = model.matryoshka.layers["model.layers.1.mlp.down_proj"]
    x = torch.randn(2, 3, layer.in_features)
    A, B = lora_weights(layer)
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + x @ A.T @ B.T / 8, atol=1e-5, rtol=1e-5)

    dy = wrapped(rank=8, method="dylora", scaling="sqrt")
    layer = dy.matryoshka.layers["model.layers.1.mlp.down_proj"]
    A, B = lora_weights(layer)
    gen = torch.Generator().manual_seed(0)
    drawn = [sample_rank(dy, gen) for _ in range(40)]
    assert set(drawn) <= {1, 2, 4, 8} and len(set(drawn)) > 1
    k = drawn[-1]
    expected = layer.get_base_layer()(x) + k ** -0.5 * x @ A[:k].T @ B[:, :k].T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # same seed, same draws; "all" samples 1..R
    assert drawn == [sample_rank(dy, g) for g in [torch.Generator().manual_seed(0)] for _ in range(40)]
    everything = wrapped(rank=8, method="dylora", dylora_ranks="all")
    assert {sample_rank(everything, gen) for _ in range(400)} == set(range(1, 9))
    assert sample_rank(model, gen) is None  # lora draws nothing


# --- the whole model ------------------------------------------------------------------------------

def by_hand(model, layer_ranks: dict):
    """A copy whose adapters are literally sliced: A[:k] and s_k B[:, :k], zero-padded, gate bypassed."""
    hand = copy.deepcopy(model)
    c = hand.matryoshka.config
    with torch.no_grad():
        for name, layer in hand.matryoshka.layers.items():
            k = layer_ranks.get(name, c.rank)
            A, B = lora_weights(layer)
            A[k:] = 0
            B[:, k:] = 0
            B.mul_(rank_scale(k, c.scaling) / c.scale_max)  # PEFT multiplies by s_R
            setattr(layer.lora_B["default"], GATE, torch.ones(c.rank))
    return hand


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_model_at_rank_k_equals_hand_slicing(kind, scaling):
    model = wrapped(kind, scaling=scaling)
    ids = tokens()
    for k in (1, 3, 8):
        with use_rank(model, k), torch.no_grad():
            got = model(ids).logits
        want = by_hand(model, dict.fromkeys(model.matryoshka.layers, k))(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_per_layer_ranks_equal_hand_slicing(kind):
    model = wrapped(kind, scaling="sqrt")
    ranks = {r"layers\.0\..*_proj$": 2, r"mlp": 4}  # first match wins: layer-0 mlp gets 2
    with use_rank(model, ranks), torch.no_grad():
        got = model(tokens()).logits
    expected = {}
    for name in model.matryoshka.layers:
        expected[name] = 2 if "layers.0." in name else 4 if "mlp" in name else 8
    want = by_hand(model, expected)(tokens()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert expected["model.layers.1.self_attn.q_proj"] == 8  # unmatched stays at R
    with pytest.raises(ValueError, match="match no adapted layer"):
        set_rank(model, {"nonexistent": 2})
    with pytest.raises(ValueError, match="inference rank 9"):
        set_rank(model, {"mlp": 9})


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_ranks_equal_per_example_runs(kind):
    model = wrapped(kind, scaling="rank")
    ids = tokens(batch=4)
    ks = torch.tensor([1, 8, 2, 4])
    with use_rank(model, ks), torch.no_grad():
        got = model(ids).logits
    for b, k in enumerate(ks.tolist()):
        with use_rank(model, k), torch.no_grad():
            alone = model(ids[b:b + 1]).logits
        torch.testing.assert_close(got[b:b + 1], alone, atol=1e-5, rtol=1e-5)
    with use_rank(model, ks), pytest.raises(ValueError, match="batch of 4"):
        model(ids[:2])


def test_use_rank_restores_previous_setting():
    model = wrapped()
    set_rank(model, 2)
    with use_rank(model, 4):
        assert model.matryoshka.setting == 4
    assert model.matryoshka.setting == 2
    set_rank(model, None)
    with torch.no_grad():
        train_logits = model(tokens()).logits
        with use_rank(model, 8):
            full = model(tokens()).logits
    assert not torch.allclose(train_logits, full)  # P != s_R·1, so training and rank R differ


# --- save, load, export -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_export_through_stock_peft_equals_use_rank(tmp_path, kind, scaling):
    model = wrapped(kind, scaling=scaling)
    model.save_pretrained(tmp_path / "run")
    ids = tokens()
    paths = export_all_ranks(tmp_path / "run", tmp_path / "ranks", ranks=range(1, 9))
    for k, path in paths.items():
        stock = PeftModel.from_pretrained(tiny_model(kind, VOCAB), path).eval()
        assert stock.peft_config["default"].r == k and stock.peft_config["default"].lora_alpha == k
        with use_rank(model, k), torch.no_grad():
            want = model(ids).logits
        with torch.no_grad():
            torch.testing.assert_close(stock(ids).logits, want, atol=1e-5, rtol=1e-5)
    # from memory, too
    export_rank(model, 3, tmp_path / "mem3")
    stock = PeftModel.from_pretrained(tiny_model(kind, VOCAB), tmp_path / "mem3").eval()
    with use_rank(model, 3), torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_export_equals_unmerged(tmp_path, kind):
    model = wrapped(kind, scaling="sqrt")
    ids = tokens()
    for k in (2, 8):
        export_rank(model, k, tmp_path / f"merged{k}", merge=True)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged{k}").eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        with use_rank(model, k), torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # the model in memory is untouched and still adapted
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # and PEFT's own merge honours the rank
    with use_rank(model, 2), torch.no_grad():
        want = model(ids).logits
    set_rank(model, 2)
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_stock_peft_loads_the_full_adapter_as_rank_R(tmp_path):
    model = wrapped(scaling="sqrt")
    model.save_pretrained(tmp_path)
    stock = PeftModel.from_pretrained(tiny_model("llama", VOCAB), tmp_path).eval()
    with use_rank(model, 8), torch.no_grad():
        torch.testing.assert_close(stock(tokens()).logits, model(tokens()).logits, atol=1e-5, rtol=1e-5)


def test_adapting_and_merging_raise_no_future_warning(tmp_path):
    """PEFT reads a property transformers >= 5.25 deprecated; its FutureWarning must not reach the users of
    adapter_shapes (train's memory check), get_matryoshka_model and a merged export."""
    config = MatryoshkaConfig(rank=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        adapter_shapes(tiny_model("llama", VOCAB), config)
        model = get_matryoshka_model(tiny_model("llama", VOCAB), config)
        export_rank(model, 2, tmp_path / "merged", merge=True)


# --- refusals and bad input ------------------------------------------------------------------------

def test_merge_in_training_mode_is_refused():
    model = wrapped()
    with pytest.raises(ValueError, match="cannot merge.*set_rank"):
        copy.deepcopy(model).merge_and_unload()
    set_rank(model, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cannot merge"):
        model.merge_adapter()


def test_set_rank_on_merged_model_is_refused():
    model = wrapped()
    set_rank(model, 4)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        set_rank(model, 2)


def test_variants_and_non_linear_targets_are_refused():
    with pytest.raises(ValueError, match="use_dora.*DoRA"):
        MatryoshkaConfig(rank=4, lora_kwargs={"use_dora": True})
    with pytest.raises(ValueError, match="embed_tokens.*cannot honour"):
        get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_matryoshka_model(wrapped(), MatryoshkaConfig(rank=4))


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, r"rank=0 .*integer >= 1"),
    ({"rank": -2}, r"rank=-2"),
    ({"rank": 8, "train_ranks": [1, 16]}, r"\[16\] outside 1\.\.8"),
    ({"rank": 8, "train_ranks": [4, 4]}, r"\[4\] repeated"),
    ({"scaling": "log"}, r"scaling='log' .*none, rank, sqrt"),
    ({"method": "adalora"}, r"method='adalora' .*matryoshka, dylora, lora"),
    ({"init": "zeros"}, r"init='zeros' .*peft, paper"),
    ({"dylora_ranks": "some"}, r"dylora_ranks='some'"),
    ({"lora_dropout": 1.5}, r"lora_dropout=1.5"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MatryoshkaConfig(**kwargs)


def test_all_config_problems_reported_at_once():
    with pytest.raises(ValueError) as e:
        MatryoshkaConfig(rank=0, scaling="x", method="y")
    assert "rank=0" in str(e.value) and "scaling='x'" in str(e.value) and "method='y'" in str(e.value)


def test_missing_target_modules():
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=4, target_modules=["query_key_value"]))


@pytest.mark.parametrize("k", [0, 9, -1, 2.0, "4"])
def test_inference_rank_outside_range(k):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        set_rank(wrapped(), k)


def test_not_a_matryoshka_model():
    with pytest.raises(ValueError, match="not a matryoshka model"):
        set_rank(tiny_model(), 2)


# --- devices, dtypes, init --------------------------------------------------------------------------

def test_bf16_base_keeps_fp32_adapters_and_gate_follows():
    base = tiny_model().to(torch.bfloat16)
    model = randomize_(get_matryoshka_model(base, MatryoshkaConfig(rank=8, method="matryoshka")))
    layer = next(iter(model.matryoshka.layers.values()))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(tokens()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.to(torch.float64)
    assert getattr(layer.lora_B["default"], GATE).dtype == torch.float64
    with use_rank(model, 2), torch.no_grad():
        assert model(tokens()).logits.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_equivalence():
    model = wrapped(scaling="sqrt").to("cuda")
    layer = next(iter(model.matryoshka.layers.values()))
    assert getattr(layer.lora_B["default"], GATE).device.type == "cuda"
    ids = tokens().cuda()
    for k in (1, 4, 8):
        with use_rank(model, k), torch.no_grad():
            want = by_hand(model, dict.fromkeys(model.matryoshka.layers, k))(ids).logits
            got = model(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.to(torch.bfloat16)
    with use_rank(model, torch.tensor([1, 4, 8], device="cuda")), torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_paper_init_bound():
    model = get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=8, init="paper", method="matryoshka"))
    peft = get_matryoshka_model(tiny_model(), MatryoshkaConfig(rank=8, init="peft", method="matryoshka"))
    name = "model.layers.0.mlp.down_proj"  # in = 64
    A = model.matryoshka.layers[name].lora_A["default"].weight
    A_peft = peft.matryoshka.layers[name].lora_A["default"].weight
    assert A.abs().max() <= 8 ** -0.5 and A.abs().max() > 0.9 * 8 ** -0.5
    assert A_peft.abs().max() <= 64 ** -0.5  # PEFT's bound 1/sqrt(in): sqrt(in/R) = sqrt(8) times smaller


# --- strict loading ------------------------------------------------------------------------------

def test_strict_loading_names_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    from matryoshka_lora import AdapterFileError

    model = wrapped(rank=4)
    model.save_pretrained(tmp_path)
    weights_path = tmp_path / "adapter_model.safetensors"
    good = load_file(weights_path)
    # wrong base shapes: a wider model
    with pytest.raises(AdapterFileError, match="wrong shapes"):
        load_matryoshka_model(AutoModelForCausalLM.from_config(tiny_config(vocab_size=VOCAB).__class__(
            **{**tiny_config(vocab_size=VOCAB).to_dict(), "hidden_size": 64})), tmp_path)
    # a missing key and an unexpected key
    broken = dict(good)
    dropped = sorted(broken)[0]
    broken.pop(dropped)
    broken["base_model.model.extra.lora_A.weight"] = torch.zeros(1)
    save_file(broken, weights_path)
    with pytest.raises(AdapterFileError, match=r"1 missing keys: .*lora.*1 unexpected keys: .*extra"):
        load_matryoshka_model(tiny_model(vocab_size=VOCAB), tmp_path)
    # a truncated file
    save_file(good, weights_path)
    data = open(weights_path, "rb").read()
    open(weights_path, "wb").write(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match=str(weights_path)):
        load_matryoshka_model(tiny_model(vocab_size=VOCAB), tmp_path)
    weights_path.unlink()
    with pytest.raises(AdapterFileError, match="not found"):
        load_matryoshka_model(tiny_model(vocab_size=VOCAB), tmp_path)
    (tmp_path / "matryoshka_config.json").write_text("{\"rank\": 4, ")
    with pytest.raises(ValueError, match="matryoshka_config.json is not valid JSON"):
        load_matryoshka_model(tiny_model(vocab_size=VOCAB), tmp_path)


def test_save_is_complete_or_absent(tmp_path, monkeypatch):
    """A save that fails halfway leaves no matryoshka_config.json, so the folder does not look complete."""
    model = wrapped(rank=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "matryoshka_config.json").exists()

    def broken_save(self, directory, *a, **k):
        with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "matryoshka_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saving-")]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="not a matryoshka-lora adapter folder"):
        load_matryoshka_model(tiny_model(vocab_size=VOCAB), tmp_path)


def test_other_base_name_warns(tmp_path):
    model = wrapped(rank=4)
    model.peft_config["default"].base_model_name_or_path = "org/model-a"
    model.save_pretrained(tmp_path)
    other = tiny_model(vocab_size=VOCAB)
    other.config._name_or_path = "org/model-b"
    with pytest.warns(UserWarning, match="trained on 'org/model-a'.*'org/model-b'"):
        load_matryoshka_model(other, tmp_path)
