"""Multi-process training on CPU (gloo): 2 processes with batch b = 1 process with batch 2b.

DDP through torchrun and through ``accelerate launch``; FSDP2 and DeepSpeed ZeRO-3 through the same Trainer paths.
accelerate 1.15 turns FSDP and DeepSpeed on only for accelerators (GPUs, ...), so the FSDP and ZeRO-3 tests start
``train`` through a small launcher that lifts exactly that gate (see ``FSDP_ON_CPU`` and ``ZERO_ON_CPU``): the
sharding itself (torch FSDP2 DTensors, DeepSpeed ZeRO-3 partitions over gloo), the Trainer, our save and load are
the real ones. Without the launcher, ``--fsdp`` on CPU is refused with one line (tested too).
"""
import importlib.util
import json
import os
import runpy
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import skip_unless
from matryoshka_lora import cli
from matryoshka_lora.cli.train import parse_args
from matryoshka_lora.training import train as train_in_process
from matryoshka_lora.training.sharding import sharding_args

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

# accelerate enables FSDP only on accelerator devices (AcceleratorState: MULTI_GPU, MULTI_XPU, ...); here it is
# also enabled for MULTI_CPU, the one thing this launcher changes.
FSDP_ON_CPU = '''
import sys
import accelerate.state
from accelerate.utils import DistributedType

init = accelerate.state.AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = init_with_fsdp_on_cpu
import torch.distributed
from matryoshka_lora.cli import main

code = main(["train", *sys.argv[1:]])
assert not torch.distributed.is_initialized(), "train left its process group to the interpreter's exit"
sys.exit(code)
'''

# accelerate starts DeepSpeed's process group only when it finds an accelerator backend (nccl, ...); here gloo
# on CPU, the one thing this launcher changes (DeepSpeed itself runs on its CPU accelerator). Besides, DeepSpeed's
# CPU accelerator would JIT-compile its shared-memory all-reduce kernel (deepspeed_shm_comm, a CPU-only speed-up
# that GPUs never use) on first use: about 3 minutes on a 2-core machine, every CI run. Without it DeepSpeed's
# collectives go through torch.distributed (gloo), as its own code does where the kernel is unavailable.
ZERO_ON_CPU = '''
import importlib
import os
import sys
import accelerate.state
from accelerate.utils import DistributedType

prepare = accelerate.state.PartialState._prepare_backend


def prepare_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = prepare(self, cpu, sagemaker_dp, backend)
    if found is None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and os.environ.get("LOCAL_RANK"):
        return "gloo", DistributedType.MULTI_CPU
    return found, kind


accelerate.state.PartialState._prepare_backend = prepare_gloo
shm = importlib.import_module("deepspeed.comm.torch")
assert hasattr(shm, "build_shm_op"), "deepspeed moved build_shm_op: update ZERO_ON_CPU"  # else 3 minutes more
shm.build_shm_op = lambda: None  # no JIT build (see above)
import torch.distributed
from matryoshka_lora.cli import main

code = main(["train", *sys.argv[1:]])
assert not torch.distributed.is_initialized(), "train left its process group to the interpreter's exit"
sys.exit(code)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, args, out, batch):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*launcher, *args, "--batch_size", str(batch), "--output_dir", out], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train(args, out, nproc, batch):
    launcher = [*TORCHRUN[:-1], str(nproc), "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    return launch([*launcher, "-m", "matryoshka_lora", "train"], args, out, batch)


def log_of(run):
    with open(os.path.join(run, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(run):
    return load_file(os.path.join(run, "adapter_model.safetensors"))


def assert_same_run(run, reference):
    """The same adapter (every tensor, full shapes, within 1e-5), per-step losses and DyLoRA draws."""
    a, b = adapter(reference), adapter(run)
    assert b.keys() == a.keys()
    for key in a:
        assert b[key].shape == a[key].shape, key  # the whole tensor, not a shard
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    assert [e["step"] for e in log_of(run)] == [e["step"] for e in log_of(reference)]
    assert [e["loss"] for e in log_of(run)] == pytest.approx([e["loss"] for e in log_of(reference)], abs=1e-5)
    assert [e["rank"] for e in log_of(run)] == [e["rank"] for e in log_of(reference)]


def assert_one_reporter(proc, steps):
    counts = (proc.stdout.count("trained "), proc.stdout.count("data arithmetic:"), proc.stderr.count(f" 0/{steps} ["))
    # one summary, one data line, one progress bar: only the main process reports (and writes)
    assert counts == (1, 1, 1), (counts, proc.stdout[-2000:], proc.stderr[-2000:])


def test_two_processes_match_one_with_double_batch(tiny_llama_dir, tmp_path, reference):
    """torchrun, 2 processes (DDP): the run of one process with double batch. DyLoRA's draws under DDP: the
    accelerate test below, launched the other way."""
    two = str(tmp_path / "two")
    proc = train(sharded_args(tiny_llama_dir, "matryoshka"), two, 2, 2)
    assert_same_run(two, reference("matryoshka"))
    assert_one_reporter(proc, STEPS)


# `matryoshka-lora train` with a Trainer whose loss is NaN at one step on one process only: NAN_RANK's process at
# optimizer step NAN_STEP. NaN is added as a constant, so the loss is NaN but the gradients stay finite: under DDP
# a NaN gradient would reach every process through the gradient all-reduce anyway; a NaN loss reaches the others
# only through the all-reduced skip decision (``guarded_step``).
NAN_ON_ONE_PROCESS = '''
import os
import sys
from matryoshka_lora import cli
from matryoshka_lora.cli.train import parse_args
from matryoshka_lora.training import train
from matryoshka_lora.training.trainer import MatryoshkaTrainer


class NanOnOneProcess(MatryoshkaTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step + 1 == int(os.environ["NAN_STEP"]) and \\
                self.args.process_index == int(os.environ["NAN_RANK"]):
            loss = loss + float("nan")
        return loss


if __name__ == "__main__":
    sys.exit(cli.run_guarded(lambda a: train(parse_args(a), NanOnOneProcess) and 0, sys.argv[1:],
                             prog="matryoshka-lora train"))
'''


def test_a_non_finite_loss_on_one_process_skips_the_step_on_all(tiny_llama_dir, tmp_path, monkeypatch, capsys,
                                                                one_thread):
    """Step 2's loss is NaN on process 1 of 2 only (its gradients finite): both processes skip step 2 and train
    on, to the adapter of one process (batch 4) that skips step 2. Fails when ``guarded_step`` does not
    all-reduce the skip decision (process 0 then steps, process 1 does not: one skip message, another adapter)."""
    script = tmp_path / "nan_on_one_process.py"
    script.write_text(NAN_ON_ONE_PROCESS)
    args = ["--model", tiny_llama_dir, "--max_examples", "16", "--max_length", "96", "--logging_steps", "1",
            "--learning_rate", "0.01", "--warmup_steps", "0", "--rank", "4", "--method", "dylora", "--max_steps",
            "4", "--save_steps", "0", "--seed", "3", "--use_cpu"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    monkeypatch.setenv("NAN_STEP", "2")
    monkeypatch.setenv("NAN_RANK", "0")  # one process (in this one, to save a start): its step 2 is skipped
    trainer_class = runpy.run_path(str(script))["NanOnOneProcess"]
    assert cli.run_guarded(lambda a: train_in_process(parse_args(a), trainer_class) and 0,
                           [*args, "--batch_size", "4", "--output_dir", one], prog="matryoshka-lora train") == 0
    skipped = "step 2: non-finite loss or gradient, step skipped (1 in a row, 1 in all)"
    assert capsys.readouterr().out.count(skipped) == 1
    monkeypatch.setenv("NAN_RANK", "1")
    proc = launch([*TORCHRUN, "--master_port", str(free_port()), str(script)], args, two, 2)
    assert proc.stdout.count(skipped) == 2, proc.stdout[-3000:]  # printed by each process: both skipped
    assert "step skipped" not in proc.stdout.replace(skipped, "")  # and no other step
    a, b = adapter(one), adapter(two)
    assert b.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    assert [e["step"] for e in log_of(two)] == [1, 2, 3, 4]  # trained on after the skip
    # the logged loss of step 2 is a mean over the processes' losses, the bad one counted as 0: not compared
    assert [e["loss"] for i, e in enumerate(log_of(two)) if i != 1] == \
        pytest.approx([e["loss"] for i, e in enumerate(log_of(one)) if i != 1], abs=1e-5)
    assert [e["rank"] for e in log_of(two)] == [e["rank"] for e in log_of(one)]
    assert_one_reporter(proc, 4)


# ---------------------------------------------------------------- accelerate launch, FSDP2, ZeRO-3

STEPS = 4


def sharded_args(model, method):
    """4 steps, a checkpoint every 2 (so checkpoints are saved under sharding, and a resume can be tested)."""
    return ["--model", model, "--max_examples", "16", "--max_length", "96", "--logging_steps", "1",
            "--learning_rate", "0.01", "--warmup_steps", "0", "--rank", "4", "--method", method,
            "--max_steps", str(STEPS), "--save_steps", "2", "--seed", "3", "--use_cpu"]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """One process with batch 4, per method (trained on first use)."""
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = str(tmp_path_factory.mktemp("reference") / method)
            train(sharded_args(tiny_llama_dir, method), runs[method], 1, 4)
        return runs[method]

    return get


def assert_loads_on_one_device(run, tiny_llama_dir):
    """The saved adapter loads strictly (every key, full shapes) onto a plain base model, without any launcher."""
    from transformers import AutoModelForCausalLM

    from matryoshka_lora.adapter_io import load_matryoshka_model
    from matryoshka_lora.model import use_rank

    model = load_matryoshka_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run)
    saved = adapter(run)
    for name, layer in model.matryoshka.layers.items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape == (4, layer.in_features) and B.shape == (layer.out_features, 4)
        torch.testing.assert_close(B, saved[f"base_model.model.{name}.lora_B.weight"])
    with torch.no_grad(), use_rank(model, 4):
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_accelerate_launch_matches_torchrun(tiny_llama_dir, tmp_path, reference):
    """``accelerate launch`` with a config file (2 processes, DDP) trains what one process trains with double batch
    (as torchrun does in the tests above)."""
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                      f"num_processes: 2\nmachine_rank: 0\nmain_process_port: {free_port()}\n"
                      "mixed_precision: 'no'\ndynamo_backend: 'NO'\nuse_cpu: false\n")
    args = sharded_args(tiny_llama_dir, "dylora")
    acc = str(tmp_path / "accelerate")
    proc = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "-m", "matryoshka_lora", "train"], args, acc, 2)
    assert_same_run(acc, reference("dylora"))
    assert_one_reporter(proc, STEPS)
    assert len(log_of(acc)) == STEPS  # one log line per step: one writer


def fsdp_launcher(tmp_path):
    script = tmp_path / "fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU)
    return [*TORCHRUN, "--master_port", str(free_port()), str(script)]


@pytest.mark.parametrize("method, state_dict_type, fsdp_file", [
    ("matryoshka", "FULL_STATE_DICT", "pytorch_model_fsdp.bin"),
    ("dylora", "SHARDED_STATE_DICT", "pytorch_model_fsdp_0"),
])
def test_fsdp2_two_processes_match_one_with_double_batch(tiny_llama_dir, tmp_path, reference, method,
                                                         state_dict_type, fsdp_file):
    """FSDP2 shards the model over 2 processes; the gathered adapter, its checkpoints and losses are those of one
    process with double batch (DyLoRA: the rank gates reach the sharded layers), and the adapter loads anywhere.
    The adapter is gathered whole with either state_dict_type (which only sets the format of FSDP's resume files)."""
    run = str(tmp_path / "fsdp")
    args = [*sharded_args(tiny_llama_dir, method), "--fsdp", "true", "--fsdp_config",
            f"{{state_dict_type: {state_dict_type}}}"]
    proc = launch(fsdp_launcher(tmp_path), args, run, 2)
    ref = reference(method)
    assert_same_run(run, ref)
    assert_one_reporter(proc, STEPS)
    checkpoint = os.path.join(run, "checkpoints", "checkpoint-2")
    assert os.path.exists(os.path.join(checkpoint, fsdp_file))  # FSDP's own resume files: FSDP was on
    assert os.path.isfile(os.path.join(checkpoint, "matryoshka_config.json"))
    a, b = adapter(os.path.join(ref, "checkpoints", "checkpoint-2")), adapter(checkpoint)
    assert b.keys() == a.keys() and all(b[k].shape == a[k].shape for k in a)  # a whole adapter, not shards
    assert all(torch.allclose(b[k], a[k], atol=1e-5, rtol=0) for k in a)
    assert_loads_on_one_device(run, tiny_llama_dir)
    if method == "dylora":  # an interrupted FSDP run resumes from its step-2 (sharded) checkpoint exactly
        resumed = str(tmp_path / "resumed")
        subprocess.run(["cp", "-r", run, resumed], check=True)
        for name in ("run_complete.json", "adapter_model.safetensors"):
            os.remove(os.path.join(resumed, name))
        subprocess.run(["rm", "-r", os.path.join(resumed, "checkpoints", f"checkpoint-{STEPS}")], check=True)
        proc = launch(fsdp_launcher(tmp_path), [*args, "--resume"], resumed, 2)
        assert proc.stdout.count("resuming from") == 1
        assert_same_run(resumed, ref)


SET_RANK_UNDER_FSDP2 = '''
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from matryoshka_lora.config import MatryoshkaConfig
from matryoshka_lora.model import get_matryoshka_model, set_fused, use_rank

dist.init_process_group("gloo")
torch.manual_seed(0)
model = get_matryoshka_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                             MatryoshkaConfig(rank=4, method="matryoshka"))
with torch.no_grad():
    for layer in model.matryoshka.layers.values():
        layer.lora_B["default"].weight.normal_()  # B = 0 at init would make every rank the same
ids = torch.tensor([[5, 6, 7, 8, 9]])
expected = {}
with torch.no_grad():
    for k in (1, 2, 4):
        with use_rank(model, k):
            expected[k] = model(input_ids=ids).logits
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    layer = next(iter(model.matryoshka.layers.values()))
    assert type(layer.lora_B["default"].weight).__name__ == "DTensor"  # sharded
    for fused in (True, False):  # the fused branch reads the gate buffer; PEFT's forward has the pre-hook apply it
        set_fused(model, fused)
        for k in (1, 2, 4):
            with use_rank(model, k):
                torch.testing.assert_close(model(input_ids=ids).logits, expected[k], atol=1e-5, rtol=0)
    assert not torch.allclose(expected[1], expected[4], atol=1e-3)  # the rank matters
print("ranks honoured under FSDP2", flush=True)
'''


def test_set_rank_reaches_the_gates_under_fsdp2(tiny_llama_dir, tmp_path):
    """A matryoshka model sharded by FSDP2 (fully_shard per decoder layer, as the Trainer wraps it): use_rank and
    set_rank reach the gates, and both the fused branch and PEFT's forward with the lora_B pre-hook give the
    unsharded model's output at every rank."""
    script = tmp_path / "set_rank_fsdp2.py"
    script.write_text(SET_RANK_UNDER_FSDP2)
    proc = subprocess.run([*TORCHRUN, "--master_port", str(free_port()), str(script), tiny_llama_dir],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ranks honoured under FSDP2") == 2


def launch_each(argv, logs, nproc=2, timeout=300):
    """Start ``nproc`` processes with the variables torchrun gives its workers and wait for every one of them.

    torchrun stops the other workers (SIGTERM) as soon as one exits non-zero, so what the others print when they
    fail too is a race; here each process runs to its own end. Returns [(exit code, stderr)] by rank."""
    port, procs, files = free_port(), [], []
    try:
        for rank in range(nproc):
            env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            files.append(open(logs / f"rank{rank}.err", "w+"))  # files, not pipes: no process blocks on a full pipe
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=files[-1], text=True, env=env))
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    return [(code, (logs / f"rank{rank}.err").read_text()) for rank, code in enumerate(codes)]


def test_fsdp_on_cpu_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    """Plain accelerate does not shard CPU processes: --fsdp there is an error, not DDP under another name.
    Every process refuses alike: one line, exit code 2, no traceback, and the folder the main process's Trainer
    created is removed again. (Under torchrun only the first process to exit is certain to print: torchrun then
    stops the other; hence the processes are started here as torchrun would start them, and each is awaited.)"""
    out = tmp_path / "out"
    runs = launch_each([sys.executable, "-m", "matryoshka_lora", "train", *sharded_args(tiny_llama_dir, "dylora"),
                        "--fsdp", "true", "--batch_size", "2", "--output_dir", str(out)], tmp_path)
    for rank, (code, err) in enumerate(runs):
        lines = [ln for ln in err.splitlines() if "matryoshka-lora train: error:" in ln]
        assert code == 2 and len(lines) == 1, (rank, code, err[-3000:])  # one line per process
        assert lines[0].startswith("matryoshka-lora train: error: fsdp='true': accelerate") and \
            "did not shard the model on cpu" in lines[0] and lines[0].endswith("remove fsdp to train with DDP"), lines
        assert "Traceback" not in err, (rank, err[-3000:])
    assert not out.exists()


def test_zero3_two_processes_match_one_with_double_batch(tiny_llama_dir, tmp_path, reference):
    """DeepSpeed ZeRO-3 partitions the model over 2 processes; the saved adapter is gathered whole."""
    skip_unless(importlib.util.find_spec("deepspeed") is not None,
                "deepspeed is not installed (pip install deepspeed, or the ci extra; it is not a dependency)")
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                              "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    script = tmp_path / "zero_on_cpu.py"
    script.write_text(ZERO_ON_CPU)
    args = [a for a in sharded_args(tiny_llama_dir, "dylora") if a != "--use_cpu"]  # accelerate: no DeepSpeed on --cpu
    run = str(tmp_path / "zero3")
    proc = launch([*TORCHRUN, "--master_port", str(free_port()), str(script)], [*args, "--deepspeed", str(ds)], run, 2)
    assert_same_run(run, reference("dylora"))
    assert_one_reporter(proc, STEPS)
    checkpoint = os.path.join(run, "checkpoints", "checkpoint-2")
    assert os.path.isdir(os.path.join(checkpoint, "global_step2"))  # DeepSpeed's own checkpoint: it was on
    assert os.path.isfile(os.path.join(checkpoint, "matryoshka_config.json"))
    assert adapter(checkpoint).keys() == adapter(run).keys()
    assert_loads_on_one_device(run, tiny_llama_dir)


# ---------------------------------------------------------------- the config keys

def test_sharding_keys_reach_the_training_arguments(tmp_path):
    fsdp_json = tmp_path / "fsdp.json"
    fsdp_json.write_text('{"fsdp_version": 2, "cpu_offload": true}')
    assert parse_args(["--fsdp"]).fsdp == "true"  # the flag alone
    assert parse_args(["--fsdp", "false"]).fsdp == ""
    assert sharding_args(parse_args([])) == {}
    c = parse_args(["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(fsdp_json)])
    assert sharding_args(c) == {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "cpu_offload": True,
                                                               "reshard_after_forward": True}}
    c = parse_args(["--fsdp", "shard_grad_op,offload"])
    assert sharding_args(c) == {"fsdp": True, "fsdp_config": {"reshard_after_forward": False, "cpu_offload": True}}
    c = parse_args(["--fsdp", "yes", "--fsdp_config", "{reshard_after_forward: false}"])
    assert sharding_args(c) == {"fsdp": True, "fsdp_config": {"reshard_after_forward": False}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fsdp: true\nfsdp_config: {version: 2}\n")
    assert sharding_args(parse_args([str(cfg)])) == {"fsdp": True, "fsdp_config": {"version": 2}}
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    assert sharding_args(parse_args(["--deepspeed", str(ds)])) == {"deepspeed": str(ds)}


BAD = [
    (["--fsdp", "fully_shard"], "fsdp='fully_shard' is not valid ('fully_shard' unknown); give true, false, or "
                                "options among full_shard, shard_grad_op, offload, auto_wrap"),
    (["--fsdp", "--fsdp_config", "{verison: 2}"], "fsdp_config key(s) 'verison' not valid; the keys are version, "),
    (["--fsdp", "--fsdp_config", "{version: 1}"], "fsdp_config version=1 is not valid; give 2 (FSDP2, the default): "
                                                 "FSDP1 wraps every lora_A and lora_B"),
    (["--fsdp_config", "{version: 2}"], "fsdp_config is set but fsdp is off"),
    (["--fsdp", "--fsdp_config", "{tmp}/none.json"], "fsdp_config='{tmp}/none.json' is not valid; the file does not "
                                                     "exist"),
    (["--fsdp", "--fsdp_config", "{tmp}/list.json"], "the file holds a list, not a JSON object"),
    (["--deepspeed", "{tmp}/zero3.json"], "ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save: "
                                          "true"),
    (["--fsdp", "--deepspeed", "{tmp}/zero2.json"], "fsdp and deepspeed are both set; choose one"),
    (["--fsdp", "true"], "fsdp='true' shards the model over several processes; start them with torchrun"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_sharding_config(argv, message, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments(fsdp=...) sets it
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli.main(["train", "--model", tiny_llama_dir, *argv, "--max_steps", "1", "--use_cpu",
                   "--output_dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("matryoshka-lora train: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "out").exists()
