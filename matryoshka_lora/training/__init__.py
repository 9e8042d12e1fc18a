"""Training: the run config (``config``), sharding settings (``sharding``), the Trainer (``trainer``) and the
run itself (``run.train``). ``from matryoshka_lora.training import train, TrainConfig``."""
from .config import TrainConfig, build_config, default_output_dir
from .run import train

__all__ = ["TrainConfig", "build_config", "default_output_dir", "train"]
