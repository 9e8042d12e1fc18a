"""Multi-process training on CPU (gloo): 2 processes with batch b = 1 process with batch 2b."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def train(args, out, nproc, batch):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "matryoshka_lora", "train", *args, "--batch_size", str(batch), "--output_dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def log_of(run):
    with open(os.path.join(run, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", ["matryoshka", "dylora"])
def test_two_processes_match_one_with_double_batch(tiny_llama_dir, tmp_path, method):
    args = ["--model", tiny_llama_dir, "--max_examples", "16", "--max_length", "96", "--logging_steps", "1",
            "--learning_rate", "0.01", "--warmup_steps", "0", "--rank", "4", "--method", method, "--max_steps", "3",
            "--save_steps", "0", "--seed", "3", "--use_cpu"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(args, one, 1, 4)
    proc = train(args, two, 2, 2)
    a, b = load_file(os.path.join(one, "adapter_model.safetensors")), load_file(os.path.join(two, "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    assert [e["loss"] for e in log_of(two)] == pytest.approx([e["loss"] for e in log_of(one)], abs=1e-5)
    assert [e["rank"] for e in log_of(two)] == [e["rank"] for e in log_of(one)]  # the same DyLoRA draws
    assert proc.stdout.count("trained ") == 1  # only the main process reports (and writes)
