"""``init_adapter``: start training from a saved adapter's weights instead of PEFT's init.

The road it opens: train plain LoRA, re-factor it by SVD (``matryoshka-lora svd``: nested, scaling "none"), then
fine-tune the re-factored adapter briefly with a nested objective (``compare``'s ``lora-svd-dylora``). Any saved
nested adapter of the same shape works as a start.
"""
import os

from peft import set_peft_model_state_dict

from ..adapter_io import read_checked
from ..errors import AdapterFileError, UserError
from ..rundir import WEIGHTS
from ..selection import matryoshka_state

# what must agree besides the layers (checked by their tensors' names): the rank and what the weights mean
MATCHING = ("rank", "scaling")


def init_problem(path: str | None) -> str | None:
    """A one-line problem with ``init_adapter=path`` found before loading anything, or None."""
    if path is not None and not os.path.isfile(os.path.join(path, WEIGHTS)):
        return (f"init_adapter={path!r} is not valid; give a folder holding a saved nested adapter "
                "(adapter_model.safetensors, matryoshka_config.json), e.g. the output of `matryoshka-lora svd`")
    return None


def load_init_adapter(model, path: str) -> None:
    """Copy the adapter saved in ``path`` into ``model``'s adapter, after checking they have the same rank, scaling
    and layers.

    Raises:
        UserError: the saved adapter is unreadable, differs from the run's, or misses some of its layers.
    """
    state = matryoshka_state(model)
    try:
        saved, _, weights = read_checked(path)
    except (AdapterFileError, FileNotFoundError, ValueError) as e:
        raise UserError(f"init_adapter={path!r}: {e}") from None
    differ = [f"{k} {getattr(saved, k)!r} (the run: {getattr(state.config, k)!r})" for k in MATCHING
              if getattr(saved, k) != getattr(state.config, k)]
    if differ:
        raise UserError(f"init_adapter={path!r} differs from this run's adapter in " + ", ".join(differ) +
                        "; set the run's values to the adapter's (a `svd` output has scaling none)")
    result = set_peft_model_state_dict(model, weights, adapter_name=state.adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UserError(f"init_adapter={path!r} does not fit this model: {len(missing)} of its adapter tensors "
                        f"missing (e.g. {(missing or ['-'])[0]}), {len(result.unexpected_keys)} unexpected")

