"""MatryoshkaConfig: the nested-rank adapter, validated as a whole; the one home of its fields and their help."""
import dataclasses
import json
import os
from dataclasses import dataclass, field

from .errors import InvalidInput
from .files import write_json
from .methods import DEFAULT_METHOD, METHOD_NAMES, METHODS, PREFIX_METHODS, method_help
from .ranks import SCALINGS, check_train_ranks, default_train_ranks, p_vector, rank_scale, uniform_weights
from .rundir import MATRYOSHKA_CONFIG as CONFIG_NAME

INITS = ("peft", "paper")
INFERENCES = ("paper", "prefix")
DYLORA_RANKS = ("train", "all")
# LoraConfig fields that MatryoshkaConfig owns, or that cannot honour the P gate.
_RESERVED_LORA_KWARGS = {
    "r": "use rank", "lora_alpha": "the scale comes from scaling", "target_modules": "use target_modules",
    "lora_dropout": "use lora_dropout", "use_dora": "DoRA's magnitude vector cannot honour P",
    "use_rslora": "the scale comes from scaling", "rank_pattern": "every module has rank `rank`",
    "alpha_pattern": "the scale comes from scaling", "lora_bias": "a bias on lora_B is not rank-nested",
    "init_lora_weights": "use init", "task_type": "set by get_matryoshka_model",
}


def key(default, help: str, kind: str):
    """A config field: its default, its meaning (shown by --help) and its kind (how the command line and YAML
    values are coerced: str, int, float, bool, ranks, floats?, modules, dict, ...; "?" allows none)."""
    meta = {"help": help, "kind": kind}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MatryoshkaConfig:
    """A nested-rank LoRA adapter.

    Args:
        rank: maximum rank R of ``lora_A`` (R x in) and ``lora_B`` (out x R).
        train_ranks: the set S of nested ranks trained together (default: powers of two up to R, and R).
        scaling: s_r per rank: "none" (1), "rank" (1/r) or "sqrt" (1/sqrt r).
        method: a name in ``methods.METHODS``: "dylora" (the default: one sampled rank k per step),
            "matryoshka" (the paper: y = W0x + B(P ⊙ Ax)), "lora" (s_R·BAx), "lora-svd" (lora, whose final
            adapter ``train`` re-factors by SVD; the default of ``train``), "matryoshka-exact" (the multi-rank
            objective Σ_r λ_r ℓ(W0 + s_r A_r B_r), batch stacked across the train ranks) or "sandwich" (the loss at
            R, at the smallest rank and at ``sandwich_n`` sampled ranks, stacked the same way); the candidates
            "distill", "dylora-distill" and "dylora-frozen" are described in ``methods.py``.
        target_modules: module names, a regex (full match, as PEFT) or "all-linear".
        lora_dropout: dropout on the adapter input, as PEFT.
        init: "peft" (PEFT's kaiming-uniform of A, bound 1/sqrt(in)) or "paper" (bound 1/sqrt(R), the authors').
        dylora_ranks: ranks DyLoRA samples from: "train" (uniform over train_ranks) or "all" (1..R).
        lora_kwargs: further ``peft.LoraConfig`` fields (e.g. ``layers_to_transform``, ``modules_to_save``).
        p_normalize: λ_r = 1/|S| (Appendix B's normalised weights) instead of Algorithm 1's λ_r = 1.
        weights: general λ_r, one per train rank (overrides ``p_normalize``): P = Σ_r λ_r s_r P_r, and the
            weights of the multi-rank loss of "matryoshka-exact".
        inference: "paper" (rank k is s_k·A_k B_k) or "prefix" (rank k is the truncation of the trained
            function, Σ_{i<=k} P_i b_i a_iᵀ, so rank R equals the training forward; matryoshka and lora only).
        sandwich_n: how many ranks "sandwich" (and "distill") samples between the smallest and the largest each step.
        dylora_probs: the draw's probability of each rank DyLoRA samples from (``dylora_ranks``), normalised; None:
            uniform (the DyLoRA paper's).

    Raises:
        ValueError: listing every invalid field at once.
    """

    rank: int = key(8, "maximum rank R of the adapter", "int")
    train_ranks: list[int] | None = key(None, "nested ranks S trained together, e.g. 1,2,4,8 (default: powers "
                                        "of two up to R, and R)", "ranks")
    scaling: str = key("none", "adapter scale s_r: none (1, the paper's choice), rank (1/r) or sqrt (1/sqrt r)",
                       "str")
    method: str = key(DEFAULT_METHOD, method_help(), "str")
    target_modules: str | list[str] = key("all-linear", "modules to adapt: names (q_proj,v_proj), a regex, or "
                                          "all-linear", "modules")
    lora_dropout: float = key(0.0, "dropout on the adapter input", "float")
    init: str = key("peft", "init of A: peft (kaiming-uniform, bound 1/sqrt(in)) or paper (bound 1/sqrt(R))", "str")
    dylora_ranks: str = key("train", "ranks DyLoRA samples from: train (the train ranks) or all (1..R)", "str")
    lora_kwargs: dict = key({}, "further peft.LoraConfig fields, e.g. {layers_to_transform: [0, 1]}", "dict")
    p_normalize: bool = key(False, "weights λ_r = 1/|S| (Appendix B) instead of Algorithm 1's λ_r = 1", "bool")
    weights: list[float] | None = key(None, "λ_r per train rank, e.g. 0.4,0.3,0.2,0.1 (default: see p_normalize)",
                                      "floats?")
    inference: str = key("paper", "what rank k means: paper (s_k·A_k B_k) or prefix (the trained function "
                         "truncated to k, so rank R is the training forward; matryoshka and lora only)", "str")
    sandwich_n: int = key(2, "sandwich: ranks sampled between the smallest and the largest each step", "int")
    dylora_probs: list[float] | None = key(None, "dylora methods: the probability of drawing each rank DyLoRA "
                                           "samples from, e.g. 0.4,0.3,0.2,0.1 (default: uniform)", "floats?")

    def __post_init__(self):
        if isinstance(self.train_ranks, tuple):
            self.train_ranks = list(self.train_ranks)
        problems = self.problems()
        if problems:
            raise InvalidInput("invalid MatryoshkaConfig: " + "; ".join(problems))
        if self.train_ranks is None:
            self.train_ranks = default_train_ranks(self.rank)
        if self.weights is not None:  # keep λ_r paired with its rank while sorting
            pairs = sorted(zip(self.train_ranks, self.weights))
            self.train_ranks, self.weights = [r for r, _ in pairs], [float(w) for _, w in pairs]
        self.train_ranks = sorted(self.train_ranks)

    def problems(self) -> list[str]:
        """Every problem with this config, as one message each."""
        out = []
        rank_ok = isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1
        if not rank_ok:
            out.append(f"rank={self.rank!r} is not valid; the rank must be an integer >= 1")
        if self.train_ranks is not None:
            if not isinstance(self.train_ranks, list):
                out.append(f"train_ranks={self.train_ranks!r} is not valid; give a list of integers")
            elif rank_ok:
                out += check_train_ranks(self.rank, self.train_ranks)
        for name, value, valid in (("scaling", self.scaling, SCALINGS), ("method", self.method, METHOD_NAMES),
                                   ("init", self.init, INITS), ("dylora_ranks", self.dylora_ranks, DYLORA_RANKS),
                                   ("inference", self.inference, INFERENCES)):
            if value not in valid:
                out.append(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout={self.lora_dropout!r} is not valid; choose a number in [0, 1)")
        tm = self.target_modules
        if not (isinstance(tm, str) and tm) and not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
            out.append(f"target_modules={tm!r} is not valid; give module names, a regex or 'all-linear'")
        if not isinstance(self.lora_kwargs, dict):
            out.append(f"lora_kwargs={self.lora_kwargs!r} is not valid; give a dict of peft.LoraConfig fields")
        else:
            for key in sorted(set(self.lora_kwargs) & set(_RESERVED_LORA_KWARGS)):
                out.append(f"lora_kwargs[{key!r}] is not allowed: {_RESERVED_LORA_KWARGS[key]}")
        out += self._objective_problems()
        return out

    def _objective_problems(self) -> list[str]:
        out = []
        n_ranks = len(self.train_ranks) if isinstance(self.train_ranks, list) else (
            len(default_train_ranks(self.rank)) if isinstance(self.rank, int) and self.rank >= 1 else None)
        if self.weights is not None:
            w = self.weights
            if not isinstance(w, (list, tuple)) or not all(isinstance(x, (int, float)) and x >= 0 for x in w) \
                    or not any(x > 0 for x in w):
                out.append(f"weights={w!r} is not valid; give one non-negative number per train rank, not all zero")
            elif n_ranks is not None and len(w) != n_ranks:
                out.append(f"weights has {len(w)} entries but there are {n_ranks} train ranks; give one per rank")
        if not isinstance(self.p_normalize, bool):
            out.append(f"p_normalize={self.p_normalize!r} is not valid; give true or false")
        if self.inference == "prefix" and self.method not in PREFIX_METHODS:
            out.append(f"inference='prefix' needs method {' or '.join(PREFIX_METHODS)} (a single trained "
                       f"function), not {self.method!r}")
        if isinstance(self.sandwich_n, bool) or not isinstance(self.sandwich_n, int) or self.sandwich_n < 0:
            out.append(f"sandwich_n={self.sandwich_n!r} is not valid; give an integer >= 0")
        return out + self._draw_problems()

    def _draw_problems(self) -> list[str]:
        probs = self.dylora_probs
        if probs is None:
            return []
        if not isinstance(probs, (list, tuple)) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in probs) or not any(probs):
            return [f"dylora_probs={probs!r} is not valid; give one non-negative number per rank drawn, not all zero"]
        try:
            n = len(self.dylora_choices())
        except (TypeError, ValueError):
            return []  # the ranks themselves are invalid: reported above
        if len(probs) != n:
            return [f"dylora_probs has {len(probs)} entries but DyLoRA draws from {n} ranks "
                    f"(dylora_ranks={self.dylora_ranks!r}); give one per rank"]
        return []

    def read_as(self, inference: str | None) -> "MatryoshkaConfig":
        """This config under another inference rule (None: unchanged). The trained weights do not depend on it,
        so a run trained with one rule can be evaluated or exported under the other.

        Raises:
            InvalidInput: an unknown rule, or "prefix" for a method that trains no single function.
        """
        if inference is None or inference == self.inference:
            return self
        return dataclasses.replace(self, inference=inference)

    def lambdas(self) -> list[float]:
        """λ_r per train rank: ``weights``, else 1/|S| with ``p_normalize``, else 1 (Algorithm 1)."""
        if self.weights is not None:
            return [float(x) for x in self.weights]
        return uniform_weights(len(self.train_ranks), self.p_normalize)

    @property
    def scale_max(self) -> float:
        """s_R, the scale stock PEFT applies to the full rank-R adapter (its lora_alpha / r)."""
        return rank_scale(self.rank, self.scaling)

    def p(self):
        """The training gate P = Σ_r λ_r s_r P_r of the matryoshka method, shape (rank,)."""
        return p_vector(self.rank, self.train_ranks, self.scaling, self.lambdas())

    def dylora_choices(self) -> list[int]:
        if self.dylora_ranks == "train":
            return sorted(self.train_ranks if self.train_ranks is not None else default_train_ranks(self.rank))
        return list(range(1, self.rank + 1))

    @property
    def method_record(self):
        """The ``methods.Method`` that says how this config trains."""
        return METHODS[self.method]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MatryoshkaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidInput(f"unknown MatryoshkaConfig keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    def save(self, directory: str) -> str:
        path = os.path.join(directory, CONFIG_NAME)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str) -> "MatryoshkaConfig":
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: not a matryoshka-lora adapter folder") from None
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None
        if not isinstance(d, dict):
            raise InvalidInput(f"{path} does not hold a JSON object")
        return cls.from_dict(d)
