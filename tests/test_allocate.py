"""Per-layer rank allocation (`allocate.py`): the pure greedy, the stacked profile losses, and planted cases.

Deliberate breaks these tests catch: the stacked profiles' row blocks mixed up (stacked losses then differ from
one-profile-at-a-time `use_rank` losses), the greedy exceeding the budget by one step, the hull keeping a dominated
option, and the drop score's sign flipped (the planted case's unrefined profile is then worse than no adapter).
"""
import itertools
import json
import os

import pytest
import torch
from peft import PeftModel

from conftest import VOCAB, wrapped
from matryoshka_lora import cli
from matryoshka_lora.adapter_io import load_run
from matryoshka_lora.base_models import load_base_model
from matryoshka_lora.profiles import profile_ranks
from matryoshka_lora.allocate_run import calibration_batches
from matryoshka_lora.allocate import allocate, check_budget, greedy_profile, hull
from matryoshka_lora.profile_scores import answer_losses, full_params, measure, module_costs
from matryoshka_lora.errors import InvalidInput
from matryoshka_lora.evaluation.generate import generate_at_ranks, score_at_ranks
from matryoshka_lora.evaluation import profile_eval, run as eval_run
from matryoshka_lora.evaluation.run import plan_eval
from matryoshka_lora.evaluation.tasks import stop_strings
from matryoshka_lora.files import write_json
from matryoshka_lora.rundir import read_train_config
from matryoshka_lora.selection import matryoshka_state, use_rank


def batch(rows=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # answers: the second half
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def exact(profile):
    return {f"^{name.replace('.', '[.]')}$": k for name, k in profile.items()}


def loss_at(model, b, profile):
    """The summed answer-token loss with the model at ``profile`` through use_rank (no zeros: 1..R only)."""
    with torch.no_grad(), use_rank(model, exact(profile)):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


def test_stacked_profile_losses_equal_one_at_a_time(one_thread):
    model = wrapped(method="dylora").eval()
    names = list(matryoshka_state(model).layers)
    profiles = [dict.fromkeys(names, 8), dict.fromkeys(names, 1),
                {n: [1, 2, 4, 8][i % 4] for i, n in enumerate(names)}]
    b = batch()
    with torch.no_grad():
        stacked = answer_losses(model, b, profiles)
    for profile, got in zip(profiles, stacked):
        torch.testing.assert_close(got, loss_at(model, b, profile), rtol=1e-5, atol=1e-5)


def test_hull_drops_dominated_and_concave_options():
    # cost 0..3; option 2 costs more than 1 and loses more (dominated); option 1 lies above the 0 → 3 line
    assert hull([0, 10, 20, 30], [5.0, 4.9, 5.5, 1.0]) == [0, 3]
    assert hull([0, 10, 20, 30], [5.0, 2.0, 1.0, 0.5]) == [0, 1, 2, 3]


@pytest.mark.parametrize("budget", [0, 39, 40, 41, 100, 119, 120, 1000])
def test_greedy_never_exceeds_the_budget_and_matches_brute_force_on_concave_scores(budget):
    costs = {"a": 10, "b": 20, "c": 5}
    scores = {"a": {0: 3.0, 1: 1.0, 2: 0.5, 4: 0.2}, "b": {0: 4.0, 1: 2.0, 2: 1.5, 4: 1.4},
              "c": {0: 0.1, 1: 0.05, 2: 0.04, 4: 0.0}}
    profile = greedy_profile(scores, costs, budget)
    used = sum(profile[m] * costs[m] for m in costs)
    assert used <= budget
    best = min((sum(scores[m][k] for m, k in zip(costs, ks)), ks) for ks in itertools.product([0, 1, 2, 4], repeat=3)
               if sum(k * costs[m] for m, k in zip(costs, ks)) <= budget)
    # the greedy is exact at the budgets its hull steps land on, and never far off between them
    assert sum(scores[m][profile[m]] for m in costs) <= best[0] + 1.0
    if budget in (0, 40, 120):
        assert sum(scores[m][profile[m]] for m in costs) == pytest.approx(best[0])


def test_budget_limits_are_one_line_errors():
    costs = {"a": 10, "b": 20}
    with pytest.raises(InvalidInput, match="below the smallest profile"):
        check_budget(9, costs, [0, 1, 2], full=60)
    with pytest.raises(InvalidInput, match="above the full adapter"):
        check_budget(61, costs, [0, 1, 2], full=60)
    check_budget(10, costs, [0, 1, 2], full=60)


def planted(seed=0):
    """A tiny model whose layer-1 adapters were trained (nested, as DyLoRA: every rank in turn) on the calibration
    batch and whose layer-0 ones are zero."""
    torch.manual_seed(seed)
    model = wrapped(method="dylora", seed=seed).train()
    state = matryoshka_state(model)
    signal = [n for n in state.layers if ".layers.1." in n]
    params = []
    for name, layer in state.layers.items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if name in signal:
            params += [A, B]
        else:
            with torch.no_grad():
                B.zero_()
            A.requires_grad_(False), B.requires_grad_(False)
    b = batch(rows=4, length=16, seed=seed)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for step in range(60):
        optimizer.zero_grad()
        with use_rank(model, [1, 2, 4, 8][step % 4]):
            model(input_ids=b["input_ids"], labels=b["labels"]).loss.backward()
        optimizer.step()
    return model.eval(), signal, [b]


@pytest.mark.parametrize("score", ["drop", "taylor"])
def test_planted_budget_goes_to_the_layers_that_carry_the_signal(score, one_thread):
    model, signal, batches = planted()
    costs = module_costs(model)
    budget = sum(8 * costs[n] for n in signal) // 2
    (result,) = allocate(model, batches, [budget], score=score, refine=2)
    assert result.params <= budget
    on_signal = sum(result.profile[n] * costs[n] for n in signal)
    assert on_signal == result.params > 0  # not one parameter on the zero adapters
    full = float(measure(model, batches, [dict.fromkeys(costs, 8)], 32)[0])
    off = float(measure(model, batches, [dict.fromkeys(costs, 0)], 32)[0])
    assert full < result.loss < off  # it keeps part of the trained effect
    assert allocate(model, batches, [budget], score=score, refine=2)[0].profile == result.profile  # deterministic
    (scored_only,) = allocate(model, batches, [budget], score=score, refine=0)  # the score alone, unrefined
    assert sum(scored_only.profile[n] * costs[n] for n in signal) == scored_only.params > 0
    if score == "drop":  # measured scores alone already beat no adapter (the Taylor estimate needs the refinement)
        assert scored_only.loss < off


def test_refinement_never_raises_the_measured_loss(one_thread):
    model, _, batches = planted(seed=1)
    budget = full_params(model) // 4
    plain, refined = (allocate(model, batches, [budget], refine=r)[0] for r in (0, 3))
    assert refined.loss <= plain.loss and refined.params <= budget


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("alloc") / "run")
    assert cli.main(["train", "--model", tiny_llama_dir, "--max_examples", "16", "--batch_size", "4",
                     "--max_length", "96", "--max_steps", "4", "--save_steps", "0", "--learning_rate", "0.01",
                     "--warmup_steps", "0", "--output_dir", out]) == 0
    return out


@pytest.fixture(scope="module")
def svd_run(tiny_llama_dir, tmp_path_factory):
    """A plain LoRA run re-factored by `svd` (nested too, scaling "none")."""
    out = str(tmp_path_factory.mktemp("alloc-svd") / "lora")
    assert cli.main(["train", "--model", tiny_llama_dir, "--method", "lora", "--max_examples", "16", "--batch_size",
                     "4", "--max_length", "96", "--max_steps", "4", "--save_steps", "0", "--learning_rate", "0.01",
                     "--warmup_steps", "0", "--output_dir", out]) == 0
    assert cli.main(["svd", out, "--output_dir", out + "-svd"]) == 0
    return out + "-svd"


@pytest.mark.parametrize("run", ["tiny_run", "svd_run"])
def test_allocate_command_writes_profiles_that_stock_peft_loads(run, tiny_llama_dir, capsys, one_thread, request):
    """A DyLoRA run and a `svd` output: every profile loads in stock PEFT and computes ``use_rank(profile)``."""
    tiny_run = request.getfixturevalue(run)
    assert cli.main(["allocate", tiny_run, "--budgets", "0.25,0.5", "--limit", "8", "--refine", "1",
                     "--eval_limit", "8"]) == 0
    printed = capsys.readouterr().out
    assert "profile, budget 0.25" in printed and "uniform rank 8" in printed
    summary = json.load(open(os.path.join(tiny_run, "profiles", "profiles.json")))
    model, tokenizer, _ = load_run(tiny_run)
    model.eval()
    batches, _ = calibration_batches(tiny_run, tokenizer, None, None, 8, 0, 8)  # the command's calibration set
    uniform = measure(model, batches, [dict.fromkeys(module_costs(model), u["rank"]) for u in summary["uniform"]], 32)
    assert [u["calibration_loss"] for u in summary["uniform"]] == pytest.approx(uniform.tolist(), rel=1e-5)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    for row, share in zip(summary["profiles"], (0.25, 0.5)):
        record = json.load(open(os.path.join(row["folder"], "rank_profile.json")))
        assert record["params"] <= int(share * summary["full_params"]) == record["budget_params"]
        assert record["params"] == sum(m["params"] for m in record["modules"].values())
        profile = {m: v["rank"] for m, v in record["modules"].items()}
        with torch.no_grad(), use_rank(model, profile_ranks(profile)):
            want = model(ids).logits
        for kind in ("adapter", "padded"):
            stock = PeftModel.from_pretrained(load_base_model(tiny_llama_dir), os.path.join(row["folder"], kind))
            with torch.no_grad():
                torch.testing.assert_close(stock.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget,message", [("1.5", "is not valid; give a share"), ("abc", "is not valid"),
                                            ("2", "below the smallest profile"), ("9G", "above the full adapter")])
def test_bad_budget_is_one_line_and_writes_nothing(tiny_run, budget, message, capsys, tmp_path):
    out = str(tmp_path / "profiles")
    assert cli.main(["allocate", tiny_run, "--budget", budget, "--limit", "4", "--output_dir", out]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_a_profile_is_never_worse_on_calibration_than_a_uniform_rank_that_fits(one_thread):
    """With no refinement and a useless score (all zero), the search starts from the best uniform rank that fits."""
    model, _, batches = planted(seed=2)
    costs = module_costs(model)
    budget = 4 * sum(costs.values())  # uniform rank 4 fits exactly
    from matryoshka_lora import allocate as alloc

    flat = {m: dict.fromkeys([0, 1, 2, 4, 8], 0.0) for m in costs}
    original = alloc.drop_scores
    alloc.drop_scores = lambda *a, **k: flat
    try:
        (result,) = allocate(model, batches, [budget], refine=0)
    finally:
        alloc.drop_scores = original
    uniform = measure(model, batches, [dict.fromkeys(costs, k) for k in (1, 2, 4)], 32).tolist()
    assert result.params <= budget and result.loss <= min(uniform) + 1e-6


def test_eval_profiles_scores_each_profile_as_stock_peft_runs_its_export(tiny_run, tmp_path, capsys, one_thread,
                                                                         monkeypatch):
    """`eval --profiles`: a profile at rank 4 on every module scores exactly as uniform rank 4 (same completions and
    metrics), and an allocated profile's teacher-forced loss and completions are those of stock PEFT on its exported
    adapter (merged); a rerun reuses everything without loading the model. Broken if the profile's ranks are not
    applied (it then answers at R, or at rank 4 for both)."""
    profiles, out = str(tmp_path / "profiles"), str(tmp_path / "eval")
    assert cli.main(["allocate", tiny_run, "--budget", "0.3", "--limit", "4", "--refine", "1", "--eval_limit", "0",
                     "--output_dir", profiles]) == 0
    record = json.load(open(os.path.join(profiles, "budget-0.3", "rank_profile.json")))
    write_json(os.path.join(profiles, "budget-u4", "rank_profile.json"),
               dict(record, budget="u4", modules={m: {"rank": 4} for m in record["modules"]}))
    capsys.readouterr()
    args = ["eval", tiny_run, "--profiles", profiles, "--limit", "3", "--max_new_tokens", "6", "--ranks", "2,4,8",
            "--output_dir", out, "--no_progress"]
    assert cli.main(args) == 0
    assert "profile, budget u4" in capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "profiles_eval.json")))
    assert [p["budget"] for p in summary["profiles"]] == ["0.3", "u4"] and os.path.exists(summary["output_dir"])
    rank4, u4 = (json.load(open(os.path.join(out, *p))) for p in (("ranks", "rank-4.json"), ("profiles", "budget-u4.json")))
    assert u4["samples"] == rank4["samples"] and u4["metrics"] == rank4["metrics"]
    allocated = json.load(open(os.path.join(out, "profiles", "budget-0.3.json")))
    plan = plan_eval(tiny_run, limit=3, max_new_tokens=6)
    _, tokenizer, _ = load_run(tiny_run)
    stock = PeftModel.from_pretrained(load_base_model(read_train_config(tiny_run)["model"]),
                                      os.path.join(profiles, "budget-0.3", "adapter")).merge_and_unload().eval()
    scores = score_at_ranks(stock, tokenizer, plan.backend.pairs(), [0], progress=False)[0]
    assert allocated["metrics"]["loss"] == pytest.approx(-sum(s[0] for s in scores) / sum(s[1] for s in scores),
                                                         rel=1e-5)
    assert allocated["metrics"]["loss"] != pytest.approx(rank4["metrics"]["loss"], rel=1e-5)
    texts = generate_at_ranks(stock, tokenizer, [it["prompt"] for it in plan.backend.items], [0], max_new_tokens=6,
                              stop=stop_strings(plan.backend.kind, tokenizer, []), progress=False)[0]
    assert [s["completion"] for s in allocated["samples"]] == texts

    def no_load(*args, **kwargs):
        raise AssertionError("every rank and profile is stored: nothing should load")
    monkeypatch.setattr(profile_eval, "load_model", no_load)
    monkeypatch.setattr(eval_run, "load_model", no_load)
    assert cli.main(args) == 0 and "reusing the finished profile budget 0.3" in capsys.readouterr().out


def test_eval_profiles_bad_folder_is_one_line(tiny_run, tmp_path, capsys):
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    write_json(str(other / "budget-x" / "rank_profile.json"), {"budget": "x", "modules": {"model.nope": {"rank": 1}}})
    for folder, message in ((empty, "no budget-*/rank_profile.json under"), (other, "does not fit the adapter")):
        assert cli.main(["eval", tiny_run, "--profiles", str(folder), "--limit", "2"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
