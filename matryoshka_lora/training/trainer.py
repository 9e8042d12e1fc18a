"""The Hugging Face Trainer for nested adapters, and its callbacks.

``MatryoshkaTrainer`` adds to the Trainer: the stacked methods' multi-rank loss, skipping optimizer steps with a
non-finite loss or gradient (and stopping after ``max_bad_steps`` in a row), checkpoints marked complete, FSDP2 and
ZeRO-3 gathers of the adapter, and ``train_log.jsonl``. Subclass it to change a step (tests inject faults so) and
pass the class to ``training.run.train``.
"""
import json
import os
import signal
import sys
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..errors import TrainingStopped
from ..files import write_json
from ..selection import matryoshka_state, sample_rank
from ..objectives import multi_rank_loss
from ..rundir import CHECKPOINT_DONE, LOG, latest_checkpoint


def _local(t):
    """This process's part of a tensor that FSDP2 shards (a DTensor); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t):
    """The whole of a tensor that FSDP2 shards (a collective: every process calls it in the same order)."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.device.type != t.device_mesh.device_type:  # cpu_offload: CPU shards of an accelerator mesh
        t = t.to(t.device_mesh.device_type)
    return t.full_tensor()


def _plain(d: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}


class RankCallback(TrainerCallback):
    """DyLoRA: one rank per optimizer step from a seeded generator; replays past draws on resume."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0
        self.rank = None
        self.ranks = []  # drawn since the last log

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        while self.drawn < state.global_step:  # a resumed run: same draws as the uninterrupted one
            sample_rank(model, self.generator)
            self.drawn += 1
        self.rank = sample_rank(model, self.generator)
        self.drawn += 1
        if self.rank is not None:
            self.ranks.append(self.rank)


class BarCallback(ProgressCallback):
    """The Trainer's progress bar, with loss, tokens/s and rank on the bar instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            post = {"loss": f"{logs['loss']:.4f}", "tok/s": f"{logs.get('tokens_per_s', 0):.0f}"}
            if "rank" in logs:
                post["rank"] = logs["rank"]
            self.training_bar.set_postfix(post, refresh=True)


class MatryoshkaTrainer(Trainer):
    """The Trainer, adding rank and tokens/s to every log and writing train_log.jsonl."""

    def __init__(self, *args, run_dir=None, rank_callback=None, max_bad_steps=5, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_dir = run_dir
        self.rank_callback = rank_callback
        self._last_log = None  # (time, tokens seen) at the previous log
        self.max_bad_steps = max_bad_steps
        self.bad_in_step = False  # a non-finite loss or gradient since the last optimizer step
        self.skipped_steps = 0
        self.bad_streak = 0
        self.diverged = False

    def create_optimizer(self, *args, **kwargs):
        """Wrap ``step`` so that an optimizer step with a non-finite loss or gradient is skipped."""
        optimizer = super().create_optimizer(*args, **kwargs)
        step = optimizer.step

        def guarded_step(*a, **k):
            bad = self.bad_in_step or any(p.grad is not None and not torch.isfinite(_local(p.grad)).all()
                                          for group in optimizer.param_groups for p in group["params"])
            self.bad_in_step = False
            if self.args.world_size > 1:  # FSDP shards gradients, and a loss is per process: every process
                flag = torch.tensor([float(bad)], device=self.args.device)  # must skip the same steps
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                bad = bool(flag.item())
            if not bad:
                self.bad_streak = 0
                return step(*a, **k)
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_streak += 1
            print(f"\nstep {self.state.global_step + 1}: non-finite loss or gradient, step skipped "
                  f"({self.bad_streak} in a row, {self.skipped_steps} in all)", flush=True)
            if self.bad_streak >= self.max_bad_steps:
                self.diverged = True
                self.control.should_training_stop = True
            return None

        optimizer.step = guarded_step
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Stacked methods: the multi-rank loss in one pass; the others: the model's own loss."""
        inputs.pop("token_count", None)  # packed batches: only for _track_num_input_tokens
        if not matryoshka_state(model).config.method_record.stacked:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = multi_rank_loss(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                               num_items_in_batch=num_items_in_batch if self.model_accepts_loss_kwargs else None,
                               position_ids=inputs.get("position_ids"))
        return (loss, None) if return_outputs else loss

    def _track_num_input_tokens(self, inputs):
        """Packed batches have no attention_mask to count real tokens by: their collator counts them."""
        if "token_count" not in inputs or self.args.include_num_input_tokens_seen != "non_padding":
            return super()._track_num_input_tokens(inputs)
        count = inputs["token_count"].sum().to(self.args.device)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum().item())

    def training_step(self, *args, **kwargs):
        if self._last_log is None:  # first step of this session (after a resume, the restored count)
            self._last_log = (time.perf_counter(), self.state.num_input_tokens_seen)
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss).all():
            self.bad_in_step = True
            loss = torch.zeros_like(loss)  # keep the logged mean finite; the step is skipped
        return loss

    def gathered_state_dict(self):
        """The adapter's full tensors where processes hold shards of it (FSDP, ZeRO-3), else None.

        A collective under FSDP and ZeRO-3: every process must call it; the main process gets the tensors.
        FSDP2 gathers the trainable parameters only, not the frozen base.
        """
        if self.is_fsdp_enabled:  # FSDP2 (check_sharding refuses FSDP1): parameters are DTensor shards
            return {name: _full(p).detach().cpu() for name, p in self.model.named_parameters()
                    if p.requires_grad}
        if self.is_deepspeed_enabled and \
                self.accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
            try:
                return self.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
            except TypeError:  # an older deepspeed: the whole model
                return self.accelerator.get_state_dict(self.model_wrapped)
        return None

    def save_model(self, output_dir=None, _internal_call=False):
        """FSDP: gather the adapter alone, whatever state_dict_type (the Trainer's save gathers the whole
        model, or writes no adapter at all with SHARDED_STATE_DICT)."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir or self.args.output_dir, state_dict=self.gathered_state_dict())

    def _save_checkpoint(self, model, trial):
        if self.diverged or self.bad_streak:  # only good steps get checkpoints: save_total_limit must never
            return                               # rotate the last good one out for a bad one
        try:
            super()._save_checkpoint(model, trial)
        except OSError as e:  # disk full, folder gone: the unmarked partial checkpoint is never resumed from
            kept = latest_checkpoint(os.path.dirname(self.args.output_dir))
            raise TrainingStopped(f"could not write the checkpoint of step {self.state.global_step}: {e}; "
                                  f"the previous checkpoint {kept} is intact", 1) from None
        if self.args.should_save:  # marks the checkpoint complete: --resume ignores unmarked ones
            folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            write_json(os.path.join(folder, CHECKPOINT_DONE), {"step": self.state.global_step})

    def log(self, logs, start_time=None):
        if "loss" in logs and self._last_log is not None:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
            then, before = self._last_log
            logs["tokens_per_s"] = round((tokens - before) / max(now - then, 1e-9), 1)
            self._last_log = (now, tokens)
            cb = self.rank_callback
            if cb is not None and cb.rank is not None:
                logs["rank"] = cb.rank
            if self.is_world_process_zero():
                entry = {"step": self.state.global_step, "epoch": round(self.state.epoch or 0, 4),
                         "loss": logs["loss"], "learning_rate": logs.get("learning_rate"),
                         "grad_norm": logs.get("grad_norm"), "rank": cb.rank if cb else None,
                         "ranks": list(cb.ranks) if cb else [], "tokens_per_s": logs["tokens_per_s"],
                         "tokens": tokens}
                with open(os.path.join(self.run_dir, LOG), "a") as f:
                    f.write(json.dumps(_plain(entry)) + "\n")
            if cb is not None:
                cb.ranks = []
        super().log(logs, start_time)


class SignalCallback(TrainerCallback):
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop. Second: exit at once."""

    def __init__(self):
        self.signum = None

    def install(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print("\nstopping: finishing this step and saving a checkpoint (signal again to exit at once)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
