"""matryoshka-lora: nested-rank LoRA adapters (MatryoshkaLoRA, DyLoRA, LoRA) on stock PEFT."""
from .adapter_io import AdapterFileError, export_all_ranks, export_rank, load_matryoshka_model
from .config import MatryoshkaConfig
from .model import get_matryoshka_model, sample_rank, set_fused, set_rank, step_objective, use_rank
from .objectives import multi_rank_loss, multi_rank_losses
from .ranks import aurac, default_train_ranks, log_aurac, p_vector
from .svd import svd_adapter

__version__ = "0.1.0"
__all__ = [
    "MatryoshkaConfig", "get_matryoshka_model", "set_rank", "use_rank", "sample_rank", "set_fused",
    "load_matryoshka_model", "export_rank", "export_all_ranks", "svd_adapter", "multi_rank_loss",
    "multi_rank_losses", "step_objective", "p_vector", "default_train_ranks", "aurac", "log_aurac",
    "AdapterFileError",
]
