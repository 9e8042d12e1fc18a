"""Every method through one set of checks (as PEFT's TEST_CASES): save/load, export, per-example ranks, resume.

A method case is a name and the config that makes it; whether its adapter is re-factored by SVD after training
(``lora-svd``) comes from the method table. Each case's adapter takes real optimizer steps with the method's own objective from non-zero
weights (a zero ``lora_B`` would hide bugs), so the checks see weights the method trained.
"""
import json
import os
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import VOCAB, randomize_, tiny_model, tokens
from matryoshka_lora import (METHODS, MatryoshkaConfig, export_rank, get_matryoshka_model, load_matryoshka_model,
                             multi_rank_loss, sample_rank, svd_adapter, use_rank)
from matryoshka_lora.cli import main, run_guarded
from matryoshka_lora.cli.train import parse_args
from matryoshka_lora.selection import matryoshka_state
from matryoshka_lora.svd import svd_factors
from matryoshka_lora.training import train
from matryoshka_lora.training.trainer import MatryoshkaTrainer

FIXTURE_BASE = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_run", "base")


@dataclass
class MethodCase:
    name: str
    config: dict = field(default_factory=dict)

    @property
    def svd(self) -> bool:
        """The saved adapter is re-factored by SVD (lora-svd: `train` does it at its final save)."""
        return METHODS[self.config["method"]].svd_at_end


CASES = [
    MethodCase("matryoshka", {"method": "matryoshka", "scaling": "rank"}),
    MethodCase("dylora", {"method": "dylora", "scaling": "rank"}),
    MethodCase("lora", {"method": "lora", "scaling": "rank"}),
    MethodCase("matryoshka-exact", {"method": "matryoshka-exact", "p_normalize": True}),
    MethodCase("sandwich", {"method": "sandwich", "sandwich_n": 1, "scaling": "sqrt", "p_normalize": True}),
    MethodCase("lora-svd", {"method": "lora-svd", "scaling": "sqrt"}),
    MethodCase("distill", {"method": "distill", "sandwich_n": 1, "scaling": "sqrt"}),
    MethodCase("dylora-distill", {"method": "dylora-distill", "scaling": "rank", "p_normalize": True}),
    MethodCase("dylora-frozen", {"method": "dylora-frozen", "scaling": "rank"}),
    MethodCase("dylora-frozen-weighted", {"method": "dylora-frozen", "train_ranks": [1, 2, 4],
                                          "dylora_probs": [0.5, 0.25, 0.25]}),
]
IDS = [c.name for c in CASES]
RANKS = [1, 2, 4, 8]


def test_every_method_has_a_case():
    assert {c.config["method"] for c in CASES} == set(METHODS)


def trained(case: MethodCase, directory, kind="qwen2", steps=3):
    """(model, folder): the case's adapter after ``steps`` AdamW steps of its objective, saved to ``directory``."""
    config = MatryoshkaConfig(**{"rank": 8, "train_ranks": RANKS, **case.config})
    model = randomize_(get_matryoshka_model(tiny_model(kind, VOCAB), config))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        sample_rank(model, generator)
        ids = tokens(batch=4, seed=step)
        if config.method_record.stacked:
            loss = multi_rank_loss(model, ids, ids)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(directory)
    if case.svd:
        svd_adapter(str(directory), str(directory) + "-svd")
        directory = str(directory) + "-svd"
        model = load_matryoshka_model(tiny_model(kind, VOCAB), directory)
    return model, str(directory)


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case_adapter(request, tmp_path_factory, one_thread):
    case = request.param
    model, directory = trained(case, tmp_path_factory.mktemp(case.name) / "adapter")
    return case, model, directory


def logits(model, ids, k):
    with use_rank(model, k), torch.no_grad():
        return model(ids).logits


def test_trained_weights_are_not_zero(case_adapter):
    _, _, directory = case_adapter
    weights = load_file(os.path.join(directory, "adapter_model.safetensors"))
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


def test_save_load_roundtrip(case_adapter):
    case, model, directory = case_adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "matryoshka_config.json"} <= set(os.listdir(directory))
    loaded = load_matryoshka_model(tiny_model("qwen2", VOCAB), directory)
    assert loaded.matryoshka.config == model.matryoshka.config
    ids = tokens()
    for k in [None] + RANKS:
        if k is None and model.matryoshka.config.method_record.draw is not None:
            continue  # the training gate depends on the last draw
        torch.testing.assert_close(logits(loaded, ids, k), logits(model, ids, k), atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert any(p.requires_grad for p in load_matryoshka_model(tiny_model("qwen2", VOCAB), directory,
                                                              is_trainable=True).parameters())


def test_every_rank_exports_to_stock_peft(case_adapter, tmp_path):
    _, model, directory = case_adapter
    ids = tokens()
    for k in RANKS:
        path = export_rank(directory, k, tmp_path / f"rank-{k}")
        stock = PeftModel.from_pretrained(tiny_model("qwen2", VOCAB), path).eval()
        assert stock.peft_config["default"].r == k and stock.peft_config["default"].lora_alpha == k
        with torch.no_grad():
            torch.testing.assert_close(stock(ids).logits, logits(model, ids, k), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model, ids, 1), logits(model, ids, 8))  # the ranks are told apart


def test_merged_export_equals_the_rank(case_adapter, tmp_path):
    _, model, _ = case_adapter
    ids = tokens()
    export_rank(model, 2, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, logits(model, ids, 2), atol=1e-5, rtol=1e-5)


def test_per_example_ranks_equal_one_rank_at_a_time(case_adapter):
    _, model, _ = case_adapter
    ids = tokens(batch=4)
    ks = torch.tensor([8, 1, 4, 2])
    got = logits(model, ids, ks)
    for b, k in enumerate(ks.tolist()):
        torch.testing.assert_close(got[b:b + 1], logits(model, ids[b:b + 1], k), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- resume through the command line

TRAIN = ["--model", FIXTURE_BASE, "--data", "arithmetic", "--max_examples", "24", "--max_length", "64",
         "--rank", "4", "--batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
         "--learning_rate", "0.01", "--warmup_steps", "0", "--use_cpu", "--seed", "2"]


def cli_args(config: dict) -> list[str]:
    """A case's config as `train` options (lists comma-joined)."""
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in config.items()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resume_from_a_checkpoint_is_exact(case, tmp_path, one_thread):
    straight = str(tmp_path / "straight")
    assert main(["train", *TRAIN, *cli_args(case.config), "--output_dir", straight]) == 0
    resumed = str(tmp_path / "resumed")  # the run as it was at its step-2 checkpoint, interrupted
    shutil.copytree(straight, resumed)
    for name in os.listdir(resumed):
        if name not in ("checkpoints", "train_config.yaml", "train_log.jsonl"):
            os.remove(os.path.join(resumed, name))
    shutil.rmtree(os.path.join(resumed, "checkpoints", "checkpoint-4"))
    assert main(["train", "--resume", "--output_dir", resumed]) == 0
    want, got = (load_file(os.path.join(r, "adapter_model.safetensors")) for r in (straight, resumed))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    logs = [[json.loads(line) for line in open(os.path.join(r, "train_log.jsonl"))] for r in (straight, resumed)]
    assert [e["step"] for e in logs[1]] == [1, 2, 3, 4]
    assert [e["ranks"] for e in logs[1]] == [e["ranks"] for e in logs[0]]  # the same rank draws
    assert [e["loss"] for e in logs[1]] == pytest.approx([e["loss"] for e in logs[0]], abs=1e-6)


# ---------------------------------------------------------------- train optimises the method it was given

class Recorder(MatryoshkaTrainer):
    """The Trainer, recording the adapter it starts from and each step's batch, token count and rank draw."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not hasattr(self, "start"):
            self.start, self.steps = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, []
        batch = {k: v.detach().clone() for k, v in inputs.items()}
        self.steps.append((batch, num_items_in_batch, matryoshka_state(model).drawn))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def scale(r: int, scaling: str) -> float:
    return {"none": 1.0, "rank": 1.0 / r, "sqrt": r ** -0.5}[scaling]


def prefix_gate(R: int, k: int, value: float) -> torch.Tensor:
    return torch.tensor([value if i < k else 0.0 for i in range(R)])


def hand_losses(config: dict, R: int, S: list[int], drawn) -> list[tuple[float, torch.Tensor, bool]]:
    """(λ, gate, whether the term is the KL to rank R's detached distribution instead of the labels' loss) of each
    term of a step's training loss, written from the paper and the methods' definitions."""
    s = config.get("scaling", "none")
    method = config["method"]
    if method == "matryoshka":  # Algorithm 1: P_i = Σ_{r ∈ S, r ≥ i} s_r
        return [(1.0, torch.tensor([sum(scale(r, s) for r in S if r >= i) for i in range(1, R + 1)]), False)]
    if method in ("lora", "lora-svd"):
        return [(1.0, prefix_gate(R, R, scale(R, s)), False)]
    if method in ("dylora", "dylora-frozen"):  # rank k of this step
        return [(1.0, prefix_gate(R, drawn, scale(drawn, s)), False)]
    if method == "matryoshka-exact":
        ranks = S
    elif method == "dylora-distill":  # the drawn rank and R
        ranks = sorted({drawn, R})
    else:  # sandwich, distill: min S, max S and the drawn ones
        ranks = drawn
    lam = 1.0 / len(ranks) if config.get("p_normalize") else 1.0
    distill = method in ("distill", "dylora-distill")
    return [(lam, prefix_gate(R, r, scale(r, s)), distill and r != R) for r in ranks]


def hand_trained(case: MethodCase, recorder: Recorder, lr: float, R: int = 4):
    """The recorded start and batches through stock PEFT LoRA with the gate applied by a hook written here, plain
    SGD and the method's loss written out term by term (one forward per rank, no stacking)."""
    S = [1, 2, 4]
    s_R = scale(R, case.config.get("scaling", "none"))
    base = AutoModelForCausalLM.from_pretrained(FIXTURE_BASE)
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=R * s_R, target_modules="all-linear"))
    gate = {"g": None}
    for module in model.modules():
        if isinstance(module, LoraLayer):  # y = W0 x + s_R · B((g / s_R) ⊙ A x) = W0 x + B(g ⊙ A x)
            module.lora_B["default"].register_forward_pre_hook(lambda m, args: (args[0] * gate["g"] / s_R,))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in recorder.start.items():
            params[name].copy_(value)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch, count, drawn in recorder.steps:
        loss, answer = 0.0, batch["labels"][:, 1:] != -100

        def forward(g):
            gate["g"] = g
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]

        teacher = torch.log_softmax(forward(prefix_gate(R, R, s_R)).detach()[answer], -1)  # rank R, (M, V)
        for lam, g, from_teacher in hand_losses(case.config, R, S, drawn):
            logits = forward(g)
            if from_teacher:  # Σ over answer tokens of KL(p_R ‖ p_r)
                student = torch.log_softmax(logits[answer], -1)
                token_loss = (teacher.exp() * (teacher - student)).sum()
            else:
                token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                               ignore_index=-100, reduction="sum")
            loss = loss + lam * token_loss / count
        loss.backward()
        if case.config["method"] == "dylora-frozen":  # only slices k' < j <= k train, k' the next smaller rank
            frozen = max((r for r in S if r < drawn), default=0)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    (p.grad[:frozen] if "lora_A" in name else p.grad[:, :frozen]).zero_()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def hand_draws(case: MethodCase, steps: int, seed: int) -> list:
    """The rank draws of ``steps`` optimizer steps from the seeded generator, as the methods define them."""
    generator = torch.Generator().manual_seed(seed)
    S, draws = [1, 2, 4], []
    for _ in range(steps):
        probs = case.config.get("dylora_probs")
        if probs:  # the given probabilities
            draws.append(S[int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=generator))])
        elif case.config["method"].startswith("dylora"):  # uniform over the train ranks
            draws.append(S[int(torch.randint(len(S), (1,), generator=generator).item())])
        elif case.config["method"] in ("sandwich", "distill"):  # smallest, largest, sandwich_n of the others
            middle = S[1:-1]
            picked = torch.randperm(len(middle), generator=generator)[:case.config["sandwich_n"]].tolist()
            draws.append(sorted({S[0], S[-1], *(middle[i] for i in picked)}))
        else:
            draws.append(None)
    return draws


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_optimises_the_method_it_was_given(case, tmp_path, one_thread):
    """`train` (3 SGD steps, constant learning rate, no warm-up, no clipping) gives the adapter of a hand-written
    loop over the same batches with the method's training loss (its gate, or the multi-rank loss when stacked).

    The reference is written here, not taken from the library: stock PEFT LoRA with the gate applied by a hook,
    gates from the paper's formulas, draws from the seeded generator as each method defines them, stacked losses
    as one forward per rank. Breaks it catches (each tried on a scratch copy): the matryoshka record's gate
    replaced by lora's (``full_rank_gate``), P summed over r <= i instead of r >= i, dylora's gate ignoring the
    draw (rank R every step), the stacked methods trained by the model's own loss (``stacked=None``), sandwich
    weights not normalised under p_normalize, distill and dylora-distill trained on the labels at every rank
    (``distill=False``), dylora-frozen without its gradient hooks, dylora_probs ignored by the draw. One step could not tell the gates apart (from B = 0, A gets no
    gradient and AdamW's first step is lr·sign(grad)), hence three; SGD, because AdamW's lr·m/√v turns the
    last-bit differences of a stacked vs a per-rank forward into 1e-6 steps where a gradient is near zero.
    """
    lr = 0.5
    argv = [*TRAIN, "--max_steps", "3", "--save_steps", "0", "--optim", "sgd",
            "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--learning_rate", str(lr),
            "--output_dir", str(tmp_path / "run"), *cli_args(case.config)]
    recorder = {}

    def run(a):
        config = parse_args(a)
        trainer = {}

        class Recording(Recorder):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                trainer["it"] = self

        train(config, Recording)
        recorder["it"] = trainer["it"]
        return 0

    assert run_guarded(run, argv, prog="matryoshka-lora train") == 0
    assert len(recorder["it"].steps) == 3
    assert [drawn for _, _, drawn in recorder["it"].steps] == hand_draws(case, 3, seed=2)
    want = hand_trained(case, recorder["it"], lr)
    if case.svd:  # what trained, re-factored: B'A' = s_R·BA with decreasing singular values
        s_R = scale(4, case.config.get("scaling", "none"))
        for name in [n for n in want if "lora_A" in n]:
            pair = name.replace("lora_A", "lora_B")
            want[name], want[pair] = svd_factors(want[name], want[pair], s_R)
    got = load_file(os.path.join(tmp_path / "run", "adapter_model.safetensors"))
    assert len(got) == len(want)
    for name, value in want.items():
        key = name.replace(".default.weight", ".weight")
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)
    for part in ("lora_A", "lora_B"):  # both trained, so the gate reached the gradients of A
        assert any(not torch.equal(v, recorder["it"].start[n]) for n, v in want.items() if part in n)
