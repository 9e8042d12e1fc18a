"""Bad input at scale (hypothesis) and disk problems: never a traceback, never a half-written output folder.

Cases tried per run: 300 configs, 200 rank curves, 200 P vectors, 150 JSONL files, 60 command lines (910).
"""
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matryoshka_lora import MatryoshkaConfig, aurac, log_aurac, p_vector
from matryoshka_lora import cli
from matryoshka_lora import rundir
from matryoshka_lora.data import load_examples
from matryoshka_lora.errors import InvalidInput, UserError

anything = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=6),
                     st.lists(st.integers(-3, 40), max_size=6))
def cases(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@cases(300)
@given(st.dictionaries(st.sampled_from(["rank", "train_ranks", "scaling", "method", "init", "dylora_ranks",
                                        "lora_dropout", "weights", "inference", "sandwich_n", "p_normalize",
                                        "target_modules"]), anything, max_size=5))
def test_configs_are_valid_or_rejected_with_a_message(kwargs):
    try:
        c = MatryoshkaConfig(**kwargs)
    except InvalidInput as e:
        assert "is not valid" in str(e) or "not allowed" in str(e) or "entries" in str(e) or "outside" in str(e) \
            or "repeated" in str(e) or "empty" in str(e) or "needs method" in str(e)
        return
    assert c.train_ranks == sorted(c.train_ranks) and 1 <= c.train_ranks[0] and c.train_ranks[-1] <= c.rank
    P = c.p()
    assert P.shape == (c.rank,) and torch.all(P[:-1] >= P[1:])  # nested: earlier components weigh at least as much


@cases(200)
@given(st.lists(st.tuples(st.integers(-2, 300), st.floats(-1, 2, allow_nan=False)), max_size=8))
def test_rank_curves(points):
    ranks, values = [r for r, _ in points], [v for _, v in points]
    try:
        a, la = aurac(ranks, values), log_aurac(ranks, values)
    except InvalidInput:
        return
    assert min(values) - 1e-9 <= a <= max(values) + 1e-9 and min(values) - 1e-9 <= la <= max(values) + 1e-9


@cases(200)
@given(st.integers(-2, 70), st.lists(st.integers(-2, 80), max_size=7), st.sampled_from(["none", "rank", "sqrt", "x"]))
def test_p_vector(rank, train_ranks, scaling):
    try:
        P = p_vector(rank, train_ranks, scaling)
    except InvalidInput:
        return
    assert P.shape == (rank,) and (P >= 0).all() and P[0] > 0


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                          max_leaves=6)
row = st.one_of(st.fixed_dictionaries({"question": st.text(max_size=20), "answer": st.text(max_size=20)}),
                st.fixed_dictionaries({"prompt": st.text(max_size=20), "completion": json_value}),
                st.dictionaries(st.sampled_from(["question", "prompt", "messages", "x"]), json_value, max_size=2))
line = st.one_of(row.map(json.dumps), st.text(max_size=20), st.binary(max_size=12).map(lambda b: b.decode("latin-1")))


@cases(150)
@given(st.lists(line, max_size=5), st.binary(max_size=4))
def test_jsonl_contents(tmp_path, lines, tail):
    path = tmp_path / "data.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8") + tail)
    try:
        examples = load_examples(str(path), "train")
    except UserError as e:
        assert str(path) in str(e) or "data" in str(e)
        return
    assert examples and all(isinstance(e["prompt"], str) and isinstance(e["completion"], str) for e in examples)


option = st.sampled_from(["--rank", "--method", "--train_ranks", "--scaling", "--max_steps", "--learning_rate",
                          "--weights", "--batch_size", "--bogus", "--seed", "--lora_kwargs", "--resume", "-x"])
token = st.one_of(option, st.sampled_from(["0", "-1", "8", "1,2,99", "abc", "{a: 1}", "nan", "", "lora", "true"]))


@cases(60)
@given(st.lists(token, max_size=6))
def test_cli_fuzz(tmp_path_factory, capsys, argv):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    code = cli.main(["train", *argv, "--model", "/nonexistent/model", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") <= 2
    assert not out.exists()


# --- disk problems ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def args(tiny_llama_dir):
    return ["--model", tiny_llama_dir, "--max_examples", "16", "--batch_size", "4", "--max_length", "96",
            "--logging_steps", "1", "--warmup_steps", "0", "--rank", "4", "--max_steps", "4", "--save_steps", "2"]


def test_disk_full_is_detected_before_training(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    assert cli.main(["train", *args, "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "1 MiB free on its disk, the run needs about" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_output_under_a_file_is_refused(args, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["train", *args, "--output_dir", str(tmp_path / "afile" / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_failed_checkpoint_write_keeps_the_previous(args, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    original = Trainer._save_checkpoint

    def flaky(self, model, trial):
        if self.state.global_step == 4:
            os.makedirs(os.path.join(self.args.output_dir, "checkpoint-4"), exist_ok=True)
            raise OSError(28, "No space left on device")
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", flaky)
    run = str(tmp_path / "run")
    assert cli.main(["train", *args, "--output_dir", run]) == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4" in err and "checkpoint-2 is intact" in err
    assert rundir.latest_checkpoint(run).endswith("checkpoint-2")
    assert not os.path.exists(os.path.join(run, rundir.COMPLETE))


def test_failed_final_save_exits_1_and_stays_resumable(args, tmp_path, monkeypatch, capsys):
    """Disk full while the final adapter is moved into place: exit 1 with one message naming the intact last
    checkpoint, no run_complete.json, no temporary folder left; --resume then finishes the run. Fails when
    ``finish`` does not turn the OSError into that stop (a traceback instead), or marks the run complete anyway."""
    def disk_full(src, dst):  # the adapter and tokenizer are written to the temporary folder, then this
        raise OSError(28, "No space left on device")

    run = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(rundir, "move_contents", disk_full)  # what save_final calls
        assert cli.main(["train", *args, "--output_dir", run]) == 1
    err = capsys.readouterr().err
    last = os.path.join(run, rundir.CHECKPOINTS, "checkpoint-4")
    assert f"could not write the final adapter to {run}: [Errno 28] No space left on device; the last " \
           f"checkpoint {last} is intact" in err and "Traceback" not in err, err
    assert not os.path.exists(os.path.join(run, rundir.COMPLETE))
    assert not os.path.exists(os.path.join(run, rundir.WEIGHTS))
    assert not [f for f in os.listdir(run) if f.startswith(".final-tmp-")]
    assert rundir.latest_checkpoint(run) == last
    assert cli.main(["train", *args, "--output_dir", run, "--resume"]) == 0  # nothing left to train: the save
    assert f"resuming from {last}" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(run, rundir.COMPLETE)) and os.path.isfile(os.path.join(run, rundir.WEIGHTS))


def test_only_safe_loading():
    """Weights are safetensors; any torch.load, ours or the Trainer's checkpoint resume, uses weights_only=True.
    The check must see what it checks: every ``torch.load(`` of the Trainer (its optimizer, scheduler and RNG
    state among them) is one it read, and all of our package's files are read, subpackages included. Fails when
    the Trainer's calls are not found (e.g. they moved out of ``transformers.trainer``, or a pattern that matches
    nothing: the test would pass with no call checked), and on a ``torch.load`` without ``weights_only=True`` in
    a subpackage (``training/``, ...), which reading only the package's top-level files missed."""
    import inspect
    import re

    import transformers.trainer
    import matryoshka_lora

    root = os.path.dirname(matryoshka_lora.__file__)
    paths = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".py")]
    assert {"training", "evaluation", "cli"} <= {os.path.basename(os.path.dirname(p)) for p in paths}
    ours = "".join(open(p).read() for p in paths)
    trainer = inspect.getsource(transformers.trainer)
    for source in (ours, trainer):
        calls = re.findall(r"torch\.load\((.*?)\)\n", source, flags=re.S)
        assert len(calls) == source.count("torch.load("), "a torch.load call the pattern does not see"
        for call in calls:
            assert "weights_only=True" in call, call
        if source is trainer:  # the checkpoint resume's loads are among those checked
            assert calls, "no torch.load found in transformers.trainer: this test would check nothing"
            missing = [n for n in ("OPTIMIZER_NAME", "SCHEDULER_NAME", "rng_file") if not any(n in c for c in calls)]
            assert not missing, f"the Trainer's resume loads {missing} were not among the calls checked: {calls}"
    assert "pickle" not in ours
    assert not re.search(r"from torch import .*\bload\b|torch\.serialization\.load", ours)
