"""One nested adapter in one vLLM LoRA slot, the rank chosen per request: a vLLM general plugin.

vLLM gives every adapter its own slot: a (max_loras, 1, max_lora_rank, in) buffer for A and (max_loras, 1, out,
max_lora_rank) for B in every LoRA layer, and a token computes ``y += (x A_i^T) B_i^T`` with i its request's slot.
The ranks of one nested adapter are prefixes of one another: rank k is ``A[:k]`` and ``B[:, :k]·c_k`` (c_k the
export's gate: s_k·1 under the paper's rule, P[:k] under "prefix"). So one slot can hold them all, and a token of
rank k computes

    y += ((x A^T) ⊙ g_k) B_m^T,    g_k = (c_k / c_m)[:k] padded with zeros to max_lora_rank,

where m is the largest rank written into the slot so far (its B_m = B[:, :m]·c_m is what the slot holds). Every rank
keeps its own adapter id and name (``NAME@rK``), so vLLM's scheduler still lets a batch mix them (``--max-loras`` =
the number of ranks); only the memory is one slot's.

vLLM has no extension point for how a LoRA layer computes, so ``register`` (the ``vllm.general_plugins`` entry
point, run in every vLLM process) rebinds two names that ``vllm.lora.model_manager`` imported: ``from_layer`` (linear
LoRA layers get one physical slot; ``set_lora`` writes a rank only when it is larger than the one held, after
checking that the held A starts with the new one; ``reset_lora`` keeps the shared slot) and ``get_punica_wrapper``
(a subclass of the platform's wrapper whose ``update_metadata`` builds the gate rows g per logical slot and whose
``add_lora_linear`` applies them). Written against vLLM 0.32 (its CPU path is what the tests run; on a GPU it needs
``--enforce-eager``). This file imports neither vLLM nor this package at import time: ``serve --one_slot`` copies it
into a folder of its own that it puts on the engine's PYTHONPATH with the entry point beside it.

The engine reads its settings from $MATRYOSHKA_LORA_ONE_SLOT: JSON ``{"gates": {"k": [c_k...]}}`` for every rank k
the server may load.
"""
import json
import logging
import os
import re

CONFIG_ENV = "MATRYOSHKA_LORA_ONE_SLOT"
PLUGIN_NAME = "matryoshka_lora_one_slot"
REPORT = ("matryoshka-lora one-slot: %d adapter ids share 1 slot in %d linear LoRA layers; their A/B buffers take "
          "%d bytes (one slot per id: %d bytes)")  # the engine log's line, read back by ``read_report``


def read_report(log_text: str) -> dict | None:
    """The numbers of the plugin's log line in an engine log ({"ids", "layers", "bytes", "bytes_one_slot_per_id"}),
    or None where the plugin did not run."""
    found = re.search(re.escape(REPORT).replace("%d", r"(\d+)"), log_text)
    keys = ("ids", "layers", "bytes", "bytes_one_slot_per_id")
    return dict(zip(keys, map(int, found.groups()))) if found else None


def read_gates(text: str | None) -> dict[int, list[float]]:
    """{rank k: c_k} from the JSON of $MATRYOSHKA_LORA_ONE_SLOT (empty when unset)."""
    if not text:
        return {}
    return {int(k): [float(v) for v in c] for k, c in json.loads(text)["gates"].items()}


def gate_rows(slot_ranks: list[int | None], gates: dict[int, list[float]], held: int, width: int) -> list[list[float]]:
    """Per logical slot, the row a token of that slot multiplies the shrink output by: (c_k / c_held)[:k] padded
    with zeros to ``width``, or zeros for an empty slot (and while nothing is held).

    Raises:
        ValueError: a slot holds a rank with no gate, or one larger than the rank held.
    """
    rows = []
    for k in slot_ranks:
        row = [0.0] * width
        if k is not None and held:
            if k not in gates or held not in gates:
                raise ValueError(f"one-slot serving: rank {k if k not in gates else held} is not a rank of the "
                                 f"nested adapter being served (ranks {sorted(gates)})")
            if k > held:
                raise ValueError(f"one-slot serving: rank {k} is active but the slot holds only rank {held}")
            row[:k] = [c / h for c, h in zip(gates[k][:k], gates[held][:k])]
        rows.append(row)
    return rows


def _rank_of(lora_a) -> int:
    tensors = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
    return max(t.shape[0] for t in tensors if t is not None)


def _is_prefix(layer, lora_a, rows: int) -> bool:
    """The first ``rows`` rows of the slot's A equal those of ``lora_a`` (every packed slice), as the ranks of one
    nested adapter do."""
    tensors = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
    for stacked, a in zip(layer.lora_a_stacked, tensors):
        if a is not None:
            held = stacked[0, 0, :rows, :a.shape[1]]
            if not bool((held == a[:rows].to(held.device, held.dtype)).all()):
                return False
    return True


def _one_slot_layer(layer, wrapper_state: dict) -> None:
    """Make ``layer`` (a linear LoRA layer built with one slot) keep the largest rank written to it."""
    original_set = layer.set_lora
    layer.nested_held = 0

    def set_lora(index, lora_a, lora_b, *args, **kwargs):
        k = _rank_of(lora_a)
        wrapper_state["slot_ranks"][index] = k
        if layer.nested_held and not _is_prefix(layer, lora_a, min(k, layer.nested_held)):
            raise ValueError(f"one-slot serving: the adapter of slot {index} (rank {k}) is not a prefix of the rank "
                             f"{layer.nested_held} already held; one slot serves the ranks of one nested adapter")
        if k > layer.nested_held:
            original_set(0, lora_a, lora_b, *args, **kwargs)
            layer.nested_held = k
            wrapper_state["held"] = max(wrapper_state["held"], k)

    layer.set_lora = set_lora
    layer.reset_lora = lambda index: None  # the slot is shared: a rank leaving must not clear the others


def _wrapper_class(base, gates: dict[int, list[float]], state: dict):
    import torch

    class OneSlotPunicaWrapper(base):
        """The platform's wrapper, with the rank gate applied between shrink and expand of linear layers."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            config = kwargs["lora_config"]
            self.nested_width = config.max_lora_rank
            # persistent, so its address survives across steps (CUDA graphs read it in place)
            self.nested_gate = torch.zeros(config.max_loras + 1, self.nested_width, dtype=torch.float32,
                                           device=self.device)

        def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
            ranks = [state["slot_ranks"].get(i) if lid is not None else None for i, lid in enumerate(lora_index_to_id)]
            rows = gate_rows(ranks, gates, state["held"], self.nested_width)
            self.nested_gate[:len(rows)].copy_(torch.tensor(rows, dtype=torch.float32))

        def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                            **kwargs):
            idx = self.token_lora_indices  # (T,) logical slot per token, -1: no adapter
            n = idx.shape[0]
            gate = self.nested_gate[idx.clamp_min(0)] * (idx >= 0).unsqueeze(1)  # (T, W)
            xs = x[:n].float()
            offset = 0
            for a, b, width in zip(lora_a_stacked, lora_b_stacked, output_slices):
                h = (xs @ a[0, 0].float().T) * gate * scale  # (T, W)
                y[:n, offset:offset + width] += (h @ b[0, 0].float().T).to(y.dtype)
                offset += width
            return y

    return OneSlotPunicaWrapper


def register() -> None:
    """The entry point: patch vLLM's LoRA model manager in this process (once; a no-op without the settings)."""
    gates = read_gates(os.environ.get(CONFIG_ENV))
    if not gates:
        return
    import vllm
    import vllm.lora.model_manager as mm
    if getattr(mm, "_matryoshka_one_slot", False):
        return
    missing = [n for n in ("from_layer", "get_punica_wrapper") if not hasattr(mm, n)] + \
        [n for n in ("_create_lora_modules", "lora_slots") if not hasattr(mm.LoRAModelManager, n)]
    if missing:
        raise RuntimeError(f"matryoshka-lora one-slot serving is written for vLLM 0.32; vLLM {vllm.__version__} has no "
                           f"{', '.join(missing)} in vllm.lora.model_manager: serve without --one_slot")
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    state = {"slot_ranks": {}, "held": 0}
    base_wrapper = resolve_obj_by_qualname(current_platform.get_punica_wrapper())
    wrapper = _wrapper_class(base_wrapper, gates, state)
    original_from_layer, original_create = mm.from_layer, mm.LoRAModelManager._create_lora_modules

    def from_layer(layer, max_loras, lora_config, packed_modules_list, model_config=None):
        if not isinstance(layer, LinearBase):
            return original_from_layer(layer, max_loras, lora_config, packed_modules_list, model_config)
        new = original_from_layer(layer, 1, lora_config, packed_modules_list, model_config)
        if isinstance(new, BaseLinearLayerWithLoRA):
            _one_slot_layer(new, state)
        return new

    def create_lora_modules(self):
        original_create(self)
        layers = [m for m in self.modules.values() if isinstance(m, BaseLinearLayerWithLoRA)]
        size = sum(t.numel() * t.element_size() for m in layers for t in (*m.lora_a_stacked, *m.lora_b_stacked))
        logging.getLogger("vllm").info(REPORT, self.lora_slots, len(layers), size, size * self.lora_slots)

    mm.from_layer, mm.get_punica_wrapper = from_layer, lambda *a, **kw: wrapper(*a, **kw)
    mm.LoRAModelManager._create_lora_modules = create_lora_modules
    mm._matryoshka_one_slot = True
