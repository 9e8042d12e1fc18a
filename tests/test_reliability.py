"""Interrupts (SIGINT/SIGTERM) and the non-finite-loss guard of `matryoshka-lora train`."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from matryoshka_lora import cli, rundir
from matryoshka_lora.cli.train import parse_args
from matryoshka_lora.training import train
from matryoshka_lora.training.trainer import MatryoshkaTrainer


@pytest.fixture(scope="module")
def args(tiny_llama_dir):
    return ["--model", tiny_llama_dir, "--max_examples", "24", "--batch_size", "4", "--max_length", "96",
            "--logging_steps", "1", "--learning_rate", "0.01", "--warmup_steps", "0", "--rank", "4",
            "--method", "dylora", "--max_steps", "4", "--save_steps", "2", "--seed", "11"]


def faulty(kill_at=None, sig=signal.SIGINT, nan_steps=()):
    """A Trainer that sends ``sig`` to this process during step ``kill_at`` and returns a NaN loss at
    ``nan_steps`` (1-based optimizer steps)."""

    class Faulty(MatryoshkaTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            loss = super().compute_loss(model, inputs, *a, **k)
            step = self.state.global_step + 1
            if step == kill_at:
                os.kill(os.getpid(), sig)
            if step in nan_steps:
                loss = loss * float("nan")
            return loss

    return Faulty


def train_with(trainer_class, argv) -> int:
    """`matryoshka-lora train ARGV` with another Trainer class: its exit code."""
    return cli.run_guarded(lambda a: train(parse_args(a), trainer_class) and 0, argv, prog="matryoshka-lora train")


def weights(run):
    return load_file(os.path.join(run, "adapter_model.safetensors"))


def log_of(run):
    with open(os.path.join(run, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight(args, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("straight") / "run")
    assert cli.main(["train", *args, "--output_dir", run]) == 0
    return run


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_resume_matches(args, straight, tmp_path, capsys, sig, code):
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's `... &`
    run = str(tmp_path / "run")
    assert train_with(faulty(kill_at=1, sig=sig), [*args, "--output_dir", run]) == code
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(sig).name} after step 1" in err and "--resume" in err
    assert "Traceback" not in err
    assert os.path.isfile(os.path.join(run, "checkpoints", "checkpoint-1", rundir.CHECKPOINT_DONE))
    assert not os.path.exists(os.path.join(run, rundir.COMPLETE))  # not a finished run
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert cli.main(["train", *args, "--output_dir", run, "--resume"]) == 0
    got, want = weights(run), weights(straight)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    assert [e["loss"] for e in log_of(run)] == pytest.approx([e["loss"] for e in log_of(straight)], abs=1e-6)
    assert [e["rank"] for e in log_of(run)] == [e["rank"] for e in log_of(straight)]


def test_second_signal_exits_at_once(args, tmp_path):
    script = tmp_path / "twice.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from matryoshka_lora import cli
        from matryoshka_lora.cli.train import parse_args
        from matryoshka_lora.training import train
        from matryoshka_lora.training.trainer import MatryoshkaTrainer
        class Twice(MatryoshkaTrainer):
            def compute_loss(self, *a, **k):
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                return super().compute_loss(*a, **k)
        argv = ["train", *{args!r}, "--output_dir", {str(tmp_path / "run")!r}][1:]
        sys.exit(cli.run_guarded(lambda a: train(parse_args(a), Twice) and 0, argv, prog="matryoshka-lora train"))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert not os.path.isdir(os.path.join(tmp_path, "run", "checkpoints", "checkpoint-1"))


def test_transient_nan_step_is_skipped(args, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_with(faulty(nan_steps={2}), [*args, "--output_dir", run]) == 0
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row, 1 in all)" in out
    assert all(torch.isfinite(t).all() for t in weights(run).values())


def test_persistent_nan_stops_and_keeps_last_good_checkpoint(args, tmp_path, capsys):
    run = str(tmp_path / "run")
    code = train_with(faulty(nan_steps={3, 4}), [*args, "--output_dir", run, "--max_bad_steps", "2", "--save_steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "2 optimizer steps in a row had a non-finite loss" in err and "Traceback" not in err
    assert "checkpoint-2" in err
    assert rundir.latest_checkpoint(run).endswith("checkpoint-2")
    assert not os.path.exists(os.path.join(run, rundir.COMPLETE))
    good = load_file(os.path.join(run, "checkpoints", "checkpoint-2", "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())


def test_resume_ignores_a_partial_checkpoint(args, straight, tmp_path, capsys):
    """A save that died halfway (no completion marker) is never picked by --resume: a run stopped while writing
    checkpoint-4 resumes from checkpoint-2 and ends as the uninterrupted run (adapter, losses, draws), and the
    half-written checkpoint-4 is written again whole. Fails when ``rundir.latest_checkpoint`` takes a checkpoint
    without its marker, or when ``--resume`` (``rundir.check_output_dir``) picks the newest checkpoint folder
    instead of ``latest_checkpoint``'s (the resume then reads the half-written adapter)."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(straight, run)
    for name in (rundir.COMPLETE, rundir.WEIGHTS):  # stopped before the final save
        os.remove(os.path.join(run, name))
    complete = os.path.join(run, rundir.CHECKPOINTS, "checkpoint-2")
    partial = os.path.join(run, rundir.CHECKPOINTS, "checkpoint-4")
    assert rundir.latest_checkpoint(run) == partial  # complete, until its save is made to have died halfway:
    os.remove(os.path.join(partial, rundir.CHECKPOINT_DONE))
    with open(os.path.join(partial, "adapter_model.safetensors"), "wb") as f:
        f.write(b"half")
    assert rundir.latest_checkpoint(run) == complete
    assert cli.main(["train", *args, "--output_dir", run, "--resume"]) == 0
    assert f"resuming from {complete}\n" in capsys.readouterr().out
    got, want = weights(run), weights(straight)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    assert [e["step"] for e in log_of(run)] == [e["step"] for e in log_of(straight)]
    assert [e["loss"] for e in log_of(run)] == pytest.approx([e["loss"] for e in log_of(straight)], abs=1e-6)
    assert [e["rank"] for e in log_of(run)] == [e["rank"] for e in log_of(straight)]
    assert os.path.isfile(os.path.join(run, rundir.COMPLETE))
    assert rundir.latest_checkpoint(run) == partial  # saved again, whole, and marked
    saved = load_file(os.path.join(partial, "adapter_model.safetensors"))
    assert saved.keys() == want.keys()


def test_resume_with_another_seed_warns(args, straight, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_with(faulty(kill_at=1), [*args, "--output_dir", run]) == 130
    capsys.readouterr()
    new_seed = [a if a != "11" else "12" for a in args]
    assert cli.main(["train", *new_seed, "--output_dir", run, "--resume"]) == 0
    assert "--resume with seed 12 but the run in" in capsys.readouterr().err
