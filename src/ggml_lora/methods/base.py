"""TrainingMethod: what a training method supplies to the loop (trainer.LoRATrainer), and nothing else.

The loop owns the schedule, epochs, evaluation and save cadence, checkpoints, resume, signals, MPI and
reporting. A method owns its data (how a source becomes rows, which rows a step takes, how they become
micro-batches), its step (forward, backward, update: the loss and metrics of one optimizer step), its
evaluation, and what it adds to checkpoints and adapter_config.json. A method is bound to one trainer and
reads the trainer's model, adapter, configs and training context through it: the context is rebuilt when
the memory plan switches gradient checkpointing or F16 copies, so a method never keeps its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# LoRATrainer in annotations: trainer.py imports this package, so the name is not imported here


@dataclass
class StepOutput:
    """One optimizer step: its loss, the supervised tokens it counted, the gradient norm before clipping,
    whether the update was applied (not when anything was not finite), and the method's own metrics."""

    loss: float
    n_tokens: int
    grad_norm: float
    applied: bool
    metrics: dict[str, Any] = field(default_factory=dict)


class TrainingMethod:
    """The base of every method; its data hooks are supervised training's (rows shuffled per epoch)."""

    name = "base"
    display_name: str | None = None   # in messages; None: the trainer's class name
    distributable = True          # trains over several MPI processes (distributed.py)
    weights_loss_rows = False     # keeps a weighted copy of the logits' gradient (counted by the memory plan)

    def __init__(self, trainer: LoRATrainer):
        self.trainer = trainer

    # what the method reads of its trainer
    @property
    def model(self):
        return self.trainer.model

    @property
    def adapter(self):
        return self.trainer.adapter

    @property
    def config(self):
        return self.trainer.config

    @property
    def lora_config(self):
        return self.trainer.lora_config

    @property
    def ctx(self):
        return self.trainer._ctx

    # ---- data --------------------------------------------------------------------------------------

    def load(self, dataset, valid=None) -> tuple[list, list, dict]:
        """(training rows or samples, validation rows or samples, {split: DataReport})."""
        raise NotImplementedError

    def load_stream(self, dataset, valid):
        """streaming=True: (a function starting the stream of (epoch, row)), validation samples, reports)."""
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{self.display_name or self.name} data are not streamed: set streaming=False")

    def eval_rows(self, data) -> list:
        """The rows ``trainer.evaluate(data)`` scores: ``data`` as rows already, or loaded from a source."""
        return self.rows(self.load(data)[0], packing=False)

    def rows(self, samples, packing: bool) -> list:
        """The rows a step chooses from, made of what ``load`` returned."""
        return list(samples)

    def longest(self, rows) -> int:
        """The longest sequence a step of these rows runs (the memory plan's length)."""
        return max(len(r.tokens) for r in rows)

    def steps_per_epoch(self, n_rows: int) -> int:
        return math.ceil(n_rows / self.trainer.global_rows)

    def step_rows(self, rows, step: int, steps_per_epoch: int):
        """(the step's batches for this process, their tokens, supervised tokens of every process's or None,
        the epoch as a fraction). Default: epoch (step - 1) // steps_per_epoch shuffled with (seed, epoch)."""
        cfg, n = self.config, self.trainer.global_rows
        epoch, j = divmod(step - 1, steps_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(rows))
        chosen = [rows[i] for i in order[j * n:(j + 1) * n]]
        return (*self.trainer.shard(chosen), (step - 1) / steps_per_epoch)

    def micro_batches(self, chosen, first_key: int = 0) -> tuple[list, int]:
        """(what ``step`` takes for these rows, their tokens without padding)."""
        return list(chosen), int(sum(len(r.tokens) for r in chosen))

    # ---- step and evaluation -----------------------------------------------------------------------

    def start(self, total_steps: int) -> None:
        """Called once a run's length is known, before its memory is planned and any checkpoint is loaded."""

    def step(self, batches, learning_rate: float, step: int, n_step_tokens: int | None = None) -> StepOutput:
        raise NotImplementedError

    def evaluate_rows(self, rows, batch_size: int, use_adapter: bool = True, f16_weights: bool = False) -> dict:
        """The ``val_`` metrics of ``rows`` (a subset per process in a distributed run, reduced here)."""
        raise NotImplementedError

    def eval_message(self, rec: dict) -> str:
        return (f"step {rec['step']}: validation loss {rec['val_loss']:.4f}"
                + (f", perplexity {rec['val_ppl']:.2f}" if "val_ppl" in rec else ""))

    # ---- state -------------------------------------------------------------------------------------

    def trajectory(self) -> dict:
        """What the method adds to the settings that decide the run (saved in the adapter's metadata)."""
        return {}

    def state(self) -> dict:
        """What the method adds to a checkpoint's state (JSON)."""
        return {}

    def state_arrays(self) -> dict[str, np.ndarray] | None:
        """Arrays the method adds to a checkpoint (AdaLoRA's moments and mask)."""
        return None

    def resume(self, state: dict, where: str) -> None:
        """Check a checkpoint's state before anything is loaded from it (CheckpointError when another
        configuration wrote it) and restore the method's counters."""

    def load_state_arrays(self, arrays: dict[str, np.ndarray], where: str) -> None:
        """Restore ``state_arrays``, after the adapter and the optimizer moments are loaded."""

    def config_extra(self) -> dict:
        """What the method adds to adapter_config.json."""
        return {}

    def save_adapter(self, path: Path, metadata: dict) -> Path:
        return self.adapter.save(path, metadata=metadata)

    def close(self) -> None:
        """Free what the method holds beyond the trainer's adapter and context."""
