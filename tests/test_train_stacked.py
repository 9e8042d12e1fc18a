"""Training with the stacked objectives (matryoshka-exact, sandwich) and the Appendix-B keys."""
import json
import os

import pytest

from matryoshka_lora import cli
from matryoshka_lora.training.config import build_config


@pytest.fixture(scope="module")
def args(tiny_llama_dir):
    return ["--model", tiny_llama_dir, "--max_examples", "16", "--batch_size", "4", "--max_length", "96",
            "--logging_steps", "1", "--learning_rate", "0.01", "--warmup_steps", "0", "--rank", "4",
            "--max_steps", "3", "--save_steps", "0", "--seed", "3"]


def log_of(run):
    with open(os.path.join(run, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sandwich_logs_its_rank_draws(args, tmp_path):
    run = str(tmp_path / "sandwich")
    assert cli.main(["train", *args, "--method", "sandwich", "--sandwich_n", "1", "--output_dir", run]) == 0
    draws = [d for entry in log_of(run) for d in entry["ranks"]]
    assert len(draws) == 3 and all(d[0] == 1 and d[-1] == 4 and len(d) == 3 for d in draws)


def test_appendix_b_keys_from_the_command_line():
    c = build_config({}, {"weights": "0.4,0.3,0.2,0.1", "inference": "prefix", "rank": "8", "method": "matryoshka"})
    assert c.weights == [0.4, 0.3, 0.2, 0.1] and c.matryoshka_config().inference == "prefix"


@pytest.mark.parametrize("override,message", [
    (["--weights", "1,2"], "weights has 2 entries but there are 3 train ranks"),
    (["--method", "dylora", "--inference", "prefix"], "inference='prefix' needs method matryoshka or lora"),
    (["--weights", "a,b,c"], "give a list of numbers"),
])
def test_bad_appendix_b_values(args, override, message, tmp_path, capsys):
    assert cli.main(["train", *args, *override, "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
