"""One nested adapter in one vLLM adapter slot (`serve --one_slot`, matryoshka_lora/vllm_one_slot.py): the gate
rows, the slot's write rule, the plugin folder the engine discovers, and end to end through vLLM."""
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from matryoshka_lora.config import MatryoshkaConfig
from matryoshka_lora.selection import inference_gate
from matryoshka_lora.serving import complete, free_port, one_slot_env
from matryoshka_lora.vllm_one_slot import CONFIG_ENV, REPORT, _one_slot_layer, gate_rows, read_gates, read_report
from conftest import embedded_model_dir
from test_evaluate import make_run, random_adapter
from test_serve import PROMPTS, _launch_serve, _wait_serving, engine_processes, vllm_python

R = 8


def export_gates(config: MatryoshkaConfig, ranks) -> dict[int, list[float]]:
    return {k: inference_gate(config, k)[:k].tolist() for k in ranks}


@pytest.mark.parametrize("scaling, inference, method", [("rank", "paper", "matryoshka"),
                                                        ("sqrt", "paper", "dylora"),
                                                        ("none", "prefix", "matryoshka")])
def test_a_gate_row_turns_the_held_rank_into_rank_k(scaling, inference, method):
    """Row k times the slot's B (rank m's export: B[:, :m]·c_m) gives rank k's export B[:, :k]·c_k."""
    config = MatryoshkaConfig(rank=R, scaling=scaling, inference=inference, method=method)
    gates = export_gates(config, [1, 2, 4, 8])
    B = torch.randn(5, R, dtype=torch.float64)
    for held in (4, 8):
        rows = gate_rows([1, None, 4, 2], gates, held, R)
        assert rows[1] == [0.0] * R  # an empty slot adds nothing
        for i, k in ((0, 1), (2, 4), (3, 2)):
            held_B = B[:, :held] * torch.tensor(gates[held], dtype=torch.float64)
            got = held_B @ torch.tensor(rows[i][:held], dtype=torch.float64).diag()
            want = torch.cat([B[:, :k] * torch.tensor(gates[k], dtype=torch.float64),
                              torch.zeros(5, held - k, dtype=torch.float64)], 1)
            torch.testing.assert_close(got, want)


def test_gate_rows_refuse_a_rank_the_slot_cannot_give():
    gates = export_gates(MatryoshkaConfig(rank=R, scaling="rank"), [1, 4, 8])
    assert gate_rows([4], gates, 0, R) == [[0.0] * R]  # nothing written yet
    with pytest.raises(ValueError, match="rank 2 is not a rank of the nested adapter"):
        gate_rows([2], gates, 8, R)
    with pytest.raises(ValueError, match="rank 8 is active but the slot holds only rank 4"):
        gate_rows([8], gates, 4, R)


class FakeLinearLoRA:
    """What vLLM's linear LoRA layer does with one slot: reset it, then copy the rank's rows in."""

    def __init__(self, width=R, d_in=6, d_out=5):
        self.lora_a_stacked = (torch.zeros(1, 1, width, d_in),)
        self.lora_b_stacked = (torch.zeros(1, 1, d_out, width),)

    def set_lora(self, index, lora_a, lora_b):
        self.lora_a_stacked[0][index] = 0
        self.lora_b_stacked[0][index] = 0
        self.lora_a_stacked[0][index, 0, :lora_a.shape[0]] = lora_a
        self.lora_b_stacked[0][index, 0, :, :lora_b.shape[1]] = lora_b


def test_the_slot_keeps_the_largest_rank_and_refuses_a_foreign_adapter():
    A, B = torch.randn(R, 6), torch.randn(5, R)
    layer, state = FakeLinearLoRA(), {"slot_ranks": {}, "held": 0}
    _one_slot_layer(layer, state)
    layer.set_lora(2, A[:2], B[:, :2])
    layer.set_lora(0, A, B * 0.5)  # rank 8 replaces rank 2
    layer.set_lora(1, A[:4], B[:, :4])  # rank 4 is a prefix: the slot keeps rank 8
    layer.reset_lora(0)  # a rank leaving keeps the shared slot
    assert state == {"slot_ranks": {2: 2, 0: 8, 1: 4}, "held": 8}
    torch.testing.assert_close(layer.lora_a_stacked[0][0, 0], A)
    torch.testing.assert_close(layer.lora_b_stacked[0][0, 0], B * 0.5)
    with pytest.raises(ValueError, match="not a prefix of the rank 8 already held"):
        layer.set_lora(3, torch.randn(4, 6), B[:, :4])


def test_the_report_line_reads_back():
    line = "INFO 12-07 [model_manager.py] " + REPORT % (5, 210, 9_740_288, 48_701_440)
    assert read_report("start\n" + line + "\nend") == {"ids": 5, "layers": 210, "bytes": 9_740_288,
                                                       "bytes_one_slot_per_id": 48_701_440}
    assert read_report("a log without the plugin") is None


def test_the_plugin_folder_is_discovered_by_entry_point_and_does_nothing_unset(tiny_llama_dir, tmp_path):
    run = make_run(tiny_llama_dir, tmp_path / "run", model=random_adapter(tiny_llama_dir, scaling="sqrt"))
    config = MatryoshkaConfig.load(run)
    env = one_slot_env(config, [1, 2, 4, 8], str(tmp_path), dict(os.environ, VLLM_PLUGINS="other"))
    assert read_gates(env[CONFIG_ENV]) == export_gates(config, [1, 2, 4, 8])
    assert read_gates(env[CONFIG_ENV])[4] == [0.5] * 4
    assert env["VLLM_PLUGINS"] == "other,matryoshka_lora_one_slot"
    probe = ("from importlib.metadata import entry_points; import importlib; "
             "[e] = [e for e in entry_points(group='vllm.general_plugins') if e.name == 'matryoshka_lora_one_slot']; "
             "f = e.load(); print(f.__module__, importlib.import_module(f.__module__).__file__); "
             "import os; os.environ.pop('" + CONFIG_ENV + "'); f()")  # unset: returns before importing vLLM
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["matryoshka_lora_one_slot", str(tmp_path / "vllm-plugin" /
                                                                  "matryoshka_lora_one_slot.py")]


@pytest.fixture(scope="module")
def smol_scaled_run(tmp_path_factory):
    """R = 8 on the embedded SmolLM2-135M with scale 1/r (so each rank's export carries its own factor and the gate
    must convert the held rank into it) and random lora_B large enough that every rank answers differently."""
    embedded_model_dir()
    from matryoshka_lora.base_models import resolve_model

    base = resolve_model("smollm2")
    run = make_run(base, tmp_path_factory.mktemp("smol-1slot") / "smol", rank=R,
                   model=random_adapter(base, rank=R, scale=0.3, scaling="rank"))
    with open(os.path.join(run, "train_config.yaml"), "w") as f:
        yaml.safe_dump({"model": "smollm2", "model_path": base, "data": "arithmetic", "dtype": "float32"}, f)
    return run


@pytest.mark.integration
def test_one_slot_serves_every_rank_and_a_mixed_stream_as_generate(smol_scaled_run):
    """`serve --one_slot`: each rank alone, then all ranks in one concurrent stream, give this project's greedy
    completions at that rank; the LoRA buffers are one slot's (a quarter of four slots'); SIGTERM leaves nothing.
    Broken if: the gate row is not c_k / c_held (checked: c_k alone fails at "rank 1"; a smaller rank overwriting the
    slot fails the unit test above)."""
    python = vllm_python()
    from matryoshka_lora.adapter_io import load_run
    from matryoshka_lora.evaluation.generate import generate_at_ranks

    port = free_port()
    proc = _launch_serve(smol_scaled_run, python, port, "--one_slot")
    try:
        model, tokenizer, _ = load_run(smol_scaled_run)
        ours = generate_at_ranks(model, tokenizer, PROMPTS, [0, 1, 2, 4, 8], max_new_tokens=16, progress=False)
        assert len({tuple(v) for v in ours.values()}) == 5  # every rank answers differently: the test can fail
        del model
        _wait_serving(proc)
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(8) as pool:
            for k in (1, 8, 2, 4, 0):  # rank 8 is written after rank 1, then 2 and 4 read its prefix
                name = "smol" if k == 0 else f"smol@r{k}"
                assert list(pool.map(lambda p: complete(url, name, p, 16)["text"], PROMPTS)) == ours[k], f"rank {k}"
        jobs = [(k, p) for p in range(len(PROMPTS)) for k in (0, 1, 2, 4, 8)]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda j: complete(url, f"smol@r{j[0]}" if j[0] else "smol", PROMPTS[j[1]], 16)["text"],
                                jobs))
        assert got == [ours[k][p] for k, p in jobs]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0 and "stopping the server" in proc.stdout.read()
    assert not engine_processes(port)
    log = open(os.path.join(smol_scaled_run, "export", "vllm.log")).read()
    found = read_report(log)
    assert found and found["ids"] == 4 and found["bytes_one_slot_per_id"] == 4 * found["bytes"] > 0
