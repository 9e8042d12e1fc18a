"""matryoshka-lora: nested-rank LoRA adapters (MatryoshkaLoRA, DyLoRA, LoRA) on stock PEFT.

The public names load on first use (PEP 562), so ``import matryoshka_lora`` and ``matryoshka-lora --help`` stay
light: torch and PEFT are imported when a name that needs them is first read.
"""
import importlib

__version__ = "0.1.0"

_WHERE = {
    "MatryoshkaConfig": "config", "get_matryoshka_model": "model", "set_rank": "selection", "use_rank": "selection",
    "sample_rank": "selection", "set_fused": "selection", "step_objective": "selection",
    "load_matryoshka_model": "adapter_io", "export_rank": "adapter_io", "export_all_ranks": "adapter_io",
    "svd_adapter": "svd", "export_profile": "profiles", "profile_ranks": "profiles", "allocate": "allocate",
    "allocate_run": "allocate_run", "multi_rank_loss": "objectives", "multi_rank_losses": "objectives",
    "p_vector": "ranks", "default_train_ranks": "ranks", "aurac": "ranks", "log_aurac": "ranks",
    "AdapterFileError": "errors", "METHODS": "methods",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'matryoshka_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
