"""A run's data as the training loop sees it: the training rows (or a stream), the validation rows, the
reports, and the schedule they give: steps per epoch, total steps, the longest sequence, which rows each
step takes. The method (methods/) decides how a source becomes rows and how rows become batches."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
import numpy as np

from .errors import InvalidArgumentError

# LoRATrainer in annotations: trainer.py imports this module, so the name is not imported here


def fingerprint(rows) -> str:
    """A hash of the rows' tokens and loss masks: a resume or a distributed run checks it is the same data."""
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r.tokens, dtype=np.int32).tobytes())
        h.update(np.packbits(np.asarray(r.mask, dtype=bool)).tobytes())
    return h.hexdigest()[:16]


@dataclass
class RunData:
    """A run's data as the loop sees it: training rows (or a stream), validation rows, reports, and the
    schedule they give (steps per epoch, total steps, the longest sequence, the fingerprint)."""

    rows: list | None
    stream: Callable | None
    valid: list
    reports: dict
    packing: bool
    steps_per_epoch: int | None
    total: int
    longest: int
    fingerprint: str
    trainer: LoRATrainer

    @classmethod
    def load(cls, trainer: LoRATrainer, dataset, valid) -> RunData:
        cfg, method = trainer.config, trainer.method
        if cfg.streaming:
            stream, valid_samples, reports = method.load_stream(dataset, valid)
            packing, rows, steps_per_epoch, total = False, None, None, cfg.max_steps
            digest = fingerprint(r for _, r in itertools.islice(stream(), 64))
        else:
            stream = None
            train_samples, valid_samples, reports = method.load(dataset, valid)
            packing = cfg.packing if cfg.packing is not None else reports["train"].format == "text"
            rows = method.rows(train_samples, packing)
            if not rows:
                raise InvalidArgumentError("the training data holds no usable samples")
            steps_per_epoch = method.steps_per_epoch(len(rows))
            total = cfg.max_steps or cfg.epochs * steps_per_epoch
            digest = fingerprint(rows)
        valid_rows = method.rows(valid_samples, packing) if valid_samples else []
        longest = cfg.max_seq_length if rows is None else method.longest(rows)
        return cls(rows, stream, valid_rows, reports, packing, steps_per_epoch, total, longest, digest, trainer)

    def batches(self, start: int) -> Callable[[int], tuple]:
        """step -> (this process's batches, their tokens, every process's supervised tokens or None, epoch)."""
        trainer = self.trainer
        if self.stream is None:
            return lambda step: trainer.method.step_rows(self.rows, step, self.steps_per_epoch)
        # the rows of the steps already taken are read again and skipped: the stream is deterministic
        streamed = itertools.islice(self.stream(), start * trainer.global_rows, None)

        def next_streamed(step):
            taken = list(itertools.islice(streamed, trainer.global_rows))
            return (*trainer.shard([row for _, row in taken]), taken[0][0])
        return next_streamed

    def describe(self, trainer: LoRATrainer) -> list[str]:
        """The lines that open a run's progress: the data and the step's size."""
        cfg, comm = trainer.config, trainer.comm
        lines = [f"{split}: {report.source} (read as training goes)" if self.rows is None and split == "train"
                 else f"{split}: {report}" for split, report in self.reports.items()]
        per_step = f"{trainer.global_rows} rows"
        if comm.size > 1:
            per_step += (f" ({comm.size} processes x {cfg.rows_per_step}, {trainer.model.n_threads or 'default'} "
                         "threads each)")
        n = trainer.adapter.n_parameters
        if self.rows is None:
            lines.append(f"training {n:,} LoRA parameters on a stream: {self.total} steps of {per_step}")
        else:
            lines.append(f"training {n:,} LoRA parameters on {len(self.rows)} rows "
                         f"({self.reports['train'].n_supervised:,} supervised tokens): {self.total} steps of "
                         f"{per_step}, {self.steps_per_epoch} steps per epoch")
        return lines
