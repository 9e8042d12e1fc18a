"""MatryoshkaConfig: what to train and how, validated as a whole."""
import dataclasses
import json
import os
from dataclasses import dataclass, field

from .ranks import SCALINGS, check_train_ranks, default_train_ranks, p_vector, rank_scale

METHODS = ("matryoshka", "dylora", "lora")
INITS = ("peft", "paper")
DYLORA_RANKS = ("train", "all")
CONFIG_NAME = "matryoshka_config.json"
# LoraConfig fields that MatryoshkaConfig owns, or that cannot honour the P gate.
_RESERVED_LORA_KWARGS = {
    "r": "use rank", "lora_alpha": "the scale comes from scaling", "target_modules": "use target_modules",
    "lora_dropout": "use lora_dropout", "use_dora": "DoRA's magnitude vector cannot honour P",
    "use_rslora": "the scale comes from scaling", "rank_pattern": "every module has rank `rank`",
    "alpha_pattern": "the scale comes from scaling", "lora_bias": "a bias on lora_B is not rank-nested",
    "init_lora_weights": "use init", "task_type": "set by get_matryoshka_model",
}


@dataclass
class MatryoshkaConfig:
    """A nested-rank LoRA adapter.

    Args:
        rank: maximum rank R of ``lora_A`` (R x in) and ``lora_B`` (out x R).
        train_ranks: the set S of nested ranks trained together (default: powers of two up to R, and R).
        scaling: s_r per rank: "none" (1), "rank" (1/r) or "sqrt" (1/sqrt r).
        method: "matryoshka" (y = W0x + B(P ⊙ Ax)), "lora" (s_R·BAx) or "dylora" (one sampled rank k per step).
        target_modules: module names, a regex (full match, as PEFT) or "all-linear".
        lora_dropout: dropout on the adapter input, as PEFT.
        init: "peft" (PEFT's kaiming-uniform of A, bound 1/sqrt(in)) or "paper" (bound 1/sqrt(R), the authors').
        dylora_ranks: ranks DyLoRA samples from: "train" (uniform over train_ranks) or "all" (1..R).
        lora_kwargs: further ``peft.LoraConfig`` fields (e.g. ``layers_to_transform``, ``modules_to_save``).

    Raises:
        ValueError: listing every invalid field at once.
    """

    rank: int = 8
    train_ranks: list[int] | None = None
    scaling: str = "none"
    method: str = "matryoshka"
    target_modules: str | list[str] = "all-linear"
    lora_dropout: float = 0.0
    init: str = "peft"
    dylora_ranks: str = "train"
    lora_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.train_ranks, tuple):
            self.train_ranks = list(self.train_ranks)
        problems = self.problems()
        if problems:
            raise ValueError("invalid MatryoshkaConfig: " + "; ".join(problems))
        if self.train_ranks is None:
            self.train_ranks = default_train_ranks(self.rank)
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
        for name, value, valid in (("scaling", self.scaling, SCALINGS), ("method", self.method, METHODS),
                                   ("init", self.init, INITS), ("dylora_ranks", self.dylora_ranks, DYLORA_RANKS)):
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
        return out

    @property
    def scale_max(self) -> float:
        """s_R, the scale stock PEFT applies to the full rank-R adapter (its lora_alpha / r)."""
        return rank_scale(self.rank, self.scaling)

    def p(self):
        """The training gate P of the matryoshka method, shape (rank,)."""
        return p_vector(self.rank, self.train_ranks, self.scaling)

    def dylora_choices(self) -> list[int]:
        return list(self.train_ranks) if self.dylora_ranks == "train" else list(range(1, self.rank + 1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MatryoshkaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MatryoshkaConfig keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    def save(self, directory: str) -> str:
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)
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
            raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return cls.from_dict(d)
