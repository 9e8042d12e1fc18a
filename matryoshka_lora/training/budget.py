"""Up-front memory check: refuse a run whose adapter and optimizer state cannot fit, before allocating them.

The disk has its twin in ``rundir.check_disk``. Both are estimates that fail early with one line, instead of an
out-of-memory kill (exit 137) after minutes of loading.
"""
import os

import torch

from ..errors import UserError

# fp32 master weight + gradient + AdamW's two moments, per adapter parameter
BYTES_PER_TRAINED_PARAMETER = 16


def available_memory(device: str) -> int | None:
    """Free bytes on ``device`` ("cuda" or "cpu"); None where it cannot be read."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None  # not Linux: no estimate


def check_memory(shapes: dict[str, tuple[int, int]] | None, rank: int, use_cpu: bool) -> None:
    """Raises: UserError when the adapter of ``rank`` on layers of ``shapes`` ({name: (in, out)}) and its AdamW
    state need more than the free memory of the training device."""
    if not shapes:
        return
    params = sum(rank * (i + o) for i, o in shapes.values())
    needed = params * BYTES_PER_TRAINED_PARAMETER
    device = "cuda" if torch.cuda.is_available() and not use_cpu and int(os.environ.get("WORLD_SIZE", "1")) == 1 \
        else "cpu"
    free = available_memory(device)
    if free is not None and needed > free:
        raise UserError(f"rank={rank}: the adapter has {params:,} parameters over {len(shapes)} layers; with their "
                        f"gradients and AdamW state training needs about {needed / 2**30:.1f} GiB, but {device} has "
                        f"{free / 2**30:.1f} GiB free; lower rank, or adapt fewer modules (target_modules)")
