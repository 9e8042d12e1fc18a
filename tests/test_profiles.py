"""Per-layer rank profiles: rank 0 per layer in ``use_rank``, and ``export_profile`` through stock PEFT.

Deliberate breaks these tests catch (each tried once): rank 0 gated like rank R in ``selection.layer_gate``
(the rank-0 and export tests); per-layer ranks still checked as 1..R (the same, and the refusal table);
whole-model ints routed through the per-layer check and gate, so rank 0 runs the base model (the refusal
table); the gate not folded into B (the sqrt and prefix export rows); ``alpha_pattern`` left out, so PEFT
scales a rank-k module by top/k (every export row); A's rows beyond a module's rank left in the padded file
(the file check of every export row); ``target_modules`` written as short names (``q_proj``), so stock PEFT
adapts the rank-0 modules too (every export row, and the 12-layer test where ``layers.1`` is off beside
``layers.10``/``layers.11``); ``profile_ranks`` returning the bare names (the lookalike table: with full
dotted names the models here cannot tell, so the names it must not take are listed); a missing module
accepted (the error table); ``inference`` ignored by the export (the prefix rows and the refusal).
"""
import copy
import json
import re

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import VOCAB, randomize_, tiny_config, tiny_model, tokens, wrapped
from matryoshka_lora import MatryoshkaConfig, get_matryoshka_model, set_rank, use_rank
from matryoshka_lora.errors import InvalidInput
from matryoshka_lora.model import GATE
from matryoshka_lora.profiles import KEY_PREFIX, export_profile, profile_ranks
from matryoshka_lora.ranks import rank_scale
from matryoshka_lora.selection import set_fused

R = 8
SEED = 3
SHAPES = {"mixed": (0, 1, R, 3, 5, 0, 2), "top4": (0, 4, 1, 2)}  # cycled over the 14 modules of the tiny model


def profile_of(model, shape: str) -> dict[str, int]:
    ranks = SHAPES[shape]
    return {name: ranks[i % len(ranks)] for i, name in enumerate(model.matryoshka.layers)}


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits


def by_hand(model, profile: dict[str, int]):
    """A copy whose adapters are literally cut: A[:k], s_k·B[:, :k] zero-padded (k = 0: zeros), gate bypassed."""
    hand = copy.deepcopy(model)
    c = hand.matryoshka.config
    with torch.no_grad():
        for name, layer in hand.matryoshka.layers.items():
            k = profile[name]
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A[k:] = 0
            B[:, k:] = 0
            B.mul_(rank_scale(k, c.scaling) / c.scale_max if k else 0.0)  # PEFT multiplies by s_R
            setattr(layer.lora_B["default"], GATE, torch.ones(c.rank))
    return hand


# --- rank 0 per layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["matryoshka", "dylora", "lora"])
@pytest.mark.parametrize("fused", [True, False])
def test_every_module_at_rank_0_is_the_base_model(method, fused):
    model = wrapped(method=method, rank=R)
    set_fused(model, fused)
    with use_rank(model, {".": 0}):
        got = logits(model)
    with model.disable_adapter():
        base = logits(model)
    torch.testing.assert_close(got, base, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits(model), base, atol=1e-3)  # the adapter does change the output


@pytest.mark.parametrize("scaling", ["none", "sqrt"])
def test_mixed_profile_with_zeros_equals_hand_slicing(scaling):
    model = wrapped(scaling=scaling, rank=R)
    profile = profile_of(model, "mixed")
    with use_rank(model, profile_ranks(profile)):
        got = logits(model)
    torch.testing.assert_close(got, logits(by_hand(model, profile)), atol=1e-5, rtol=1e-5)
    off = next(name for name, k in profile.items() if k == 0)
    layer = model.matryoshka.layers[off]
    x = torch.randn(2, 3, layer.in_features)
    with use_rank(model, profile_ranks(profile)), torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))  # rank 0: the module adds nothing


@pytest.mark.parametrize("k, valid", [
    (0, "1..8"),  # rank 0 is per layer only
    (torch.tensor([2, 0, 3]), "1..8"),  # and not per example
    ({"mlp": 9}, "0..8"), ({"mlp": -1}, "0..8"), ({"mlp": True}, "0..8"), ({"mlp": 2.0}, "0..8"),
], ids=["model-0", "example-0", "layer-9", "layer-neg", "layer-bool", "layer-float"])
def test_ranks_outside_what_is_valid_are_refused(k, valid):
    with pytest.raises(InvalidInput, match=re.escape(valid)) as e:
        set_rank(wrapped(rank=R), k)
    assert "\n" not in str(e.value)


# --- export through stock PEFT ----------------------------------------------------------------------

CASES = [(method, scaling, source, None, "mixed") for method in ("matryoshka", "dylora", "lora")
         for scaling in ("none", "sqrt") for source in ("memory", "folder")] + [
    ("matryoshka", "sqrt", "folder", "prefix", "top4"),  # P[:k] folded, read under the other rule
    ("lora", "none", "memory", "prefix", "mixed"),
    ("dylora", "sqrt", "memory", None, "top4"),  # r is the profile's largest rank, not R
]


def expected_logits(model, profile, inference):
    """``use_rank`` at the profile, with the model read under ``inference`` (as export reads it)."""
    state, own = model.matryoshka, model.matryoshka.config
    state.config = own.read_as(inference)  # before use_rank, which sets the gates from the config
    try:
        with use_rank(model, profile_ranks(profile)):
            return logits(model)
    finally:
        state.config = own


def stock_ranks(stock) -> dict[str, int]:
    """{module name: r} of the LoRA layers stock PEFT built, each checked to run at PEFT scale 1."""
    out = {}
    for name, module in stock.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            assert module.scaling["default"] == 1.0, name
            out[name[len("base_model.model."):]] = module.r["default"]
    return out


def check_files(out, profile, pad):
    """adapter_config.json's r, patterns and target modules; padded: zeros beyond each module's own rank."""
    top = max(profile.values())
    config = json.load(open(out / "adapter_config.json"))
    on = {name: k for name, k in profile.items() if k}
    assert (config["r"], config["lora_alpha"]) == (top, top)
    assert sorted(config["target_modules"]) == sorted(profile if pad else on)
    want = {} if pad else {re.escape(name): k for name, k in on.items()}
    assert config["rank_pattern"] == want and config["alpha_pattern"] == want
    weights = load_file(out / "adapter_model.safetensors")
    for name, k in profile.items():
        A, B = weights.get(f"{KEY_PREFIX}{name}.lora_A.weight"), weights.get(f"{KEY_PREFIX}{name}.lora_B.weight")
        if not pad and k == 0:
            assert A is None and B is None
            continue
        assert A.shape[0] == B.shape[1] == (top if pad else k)
        assert not A[k:].any() and not B[:, k:].any()
        assert (A[:k] != 0).all() and (B[:, :k] != 0).all()  # the module's own slices are there


@pytest.mark.parametrize("method, scaling, source, inference, shape", CASES)
def test_export_profile_through_stock_peft_equals_use_rank(tmp_path, method, scaling, source, inference, shape):
    model = wrapped(method=method, scaling=scaling, rank=R, seed=SEED)
    profile = profile_of(model, shape)
    src = model
    if source == "folder":
        model.save_pretrained(tmp_path / "run")
        src = tmp_path / "run"
    want = expected_logits(model, profile, inference)
    for pad in (False, True):
        out = tmp_path / f"pad-{pad}"
        assert export_profile(src, profile, out, pad=pad, inference=inference) == str(out)
        check_files(out, profile, pad)
        stock = PeftModel.from_pretrained(tiny_model("llama", VOCAB, SEED), out).eval()
        top = max(profile.values())
        assert stock_ranks(stock) == ({n: top for n in profile} if pad else {n: k for n, k in profile.items() if k})
        torch.testing.assert_close(logits(stock), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lookalike", [
    "model.layers.10.mlp.up_proj", "model.layers.1.mlp.up_proj2", "model.layers.1xmlp.up_proj",
    "base.model.layers.1.mlp.up_proj", "model.layers.1.mlp",
])
def test_profile_ranks_match_the_name_only(lookalike):
    """use_rank reads keys with re.search: a bare name would also take names around it or with any char at a dot."""
    [(pattern, k)] = profile_ranks({"model.layers.1.mlp.up_proj": 3}).items()
    assert k == 3 and re.search(pattern, "model.layers.1.mlp.up_proj") and not re.search(pattern, lookalike)


def deep_model(seed=SEED):
    """A 12-layer tiny Llama: module names model.layers.1.* beside model.layers.1{0,1}.*."""
    config = tiny_config("llama", VOCAB)
    config.num_hidden_layers = 12
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def test_layer_1_is_not_layer_10(tmp_path):
    model = randomize_(get_matryoshka_model(deep_model(), MatryoshkaConfig(rank=4, method="matryoshka",
                                                                           target_modules=["q_proj", "v_proj"])))
    layer_rank = {1: 0, 10: 4, 11: 2}
    profile = {name: layer_rank.get(int(name.split(".")[2]), 1 + int(name.split(".")[2]) % 3)
               for name in model.matryoshka.layers}
    for pattern in profile_ranks(profile):
        assert sum(bool(re.search(pattern, name)) for name in profile) == 1, pattern
    with use_rank(model, profile_ranks(profile)):
        want = logits(model)
    torch.testing.assert_close(want, logits(by_hand(model, profile)), atol=1e-5, rtol=1e-5)
    for pad in (False, True):
        export_profile(model, profile, tmp_path / f"pad-{pad}", pad=pad)
        stock = PeftModel.from_pretrained(deep_model(), tmp_path / f"pad-{pad}").eval()
        assert stock_ranks(stock) == ({n: 4 for n in profile} if pad else {n: k for n, k in profile.items() if k})
        torch.testing.assert_close(logits(stock), want, atol=1e-5, rtol=1e-5)


# --- refusals ------------------------------------------------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj"
BAD_PROFILES = {  # id: (the mixed profile -> a bad one, the message)
    "missing": (lambda p: {n: k for n, k in p.items() if n != Q0}, f"leaves out 1 adapted modules: {Q0!r}"),
    "missing-many": (lambda p: {n: k for n, k in p.items() if "layers.1." not in n},
                     r"leaves out 7 adapted modules: .* \(\+4 more\)"),
    "unknown": (lambda p: {**p, "model.layers.2.self_attn.q_proj": 1},
                "does not adapt: 'model.layers.2.self_attn.q_proj'"),
    "short-name": (lambda p: {**p, "q_proj": 1}, "does not adapt: 'q_proj'; adapted modules are named like"),
    "above-R": (lambda p: {**p, Q0: 9}, f"inference rank 9 for {Q0!r} is not valid; choose an integer in 0..8"),
    "negative": (lambda p: {**p, Q0: -1}, r"inference rank -1 .* 0\.\.8"),
    "bool": (lambda p: {**p, Q0: True}, r"inference rank True .* 0\.\.8"),
    "str": (lambda p: {**p, Q0: "2"}, r"inference rank '2' .* 0\.\.8"),
    "all-zero": (lambda p: dict.fromkeys(p, 0), r"every module of the profile is at rank 0.*1\.\.8"),
    "not-a-dict": (lambda p: list(p.items()), "a rank profile is a dict"),
}


@pytest.mark.parametrize("break_profile, match", BAD_PROFILES.values(), ids=BAD_PROFILES)
def test_bad_profiles_are_one_line_errors(tmp_path, break_profile, match):
    model = wrapped(rank=R)
    with pytest.raises(InvalidInput, match=match) as e:
        export_profile(model, break_profile(profile_of(model, "mixed")), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_prefix_export_of_a_method_that_cannot_read_it_is_refused(tmp_path):
    model = wrapped(method="dylora", rank=R)
    with pytest.raises(InvalidInput, match="inference='prefix' needs method matryoshka or lora"):
        export_profile(model, profile_of(model, "mixed"), tmp_path / "out", inference="prefix")
