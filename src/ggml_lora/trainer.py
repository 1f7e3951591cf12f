"""LoRATrainer: the training loop (schedule, evaluation and save cadence, checkpoints, resume, signals,
MPI, reporting) over one training method (methods/: SFT, AdaLoRA, DPO/ORPO/KTO, GRPO), which it knows
only through methods.base.TrainingMethod.

Everything that decides the trajectory is a function of (configs, data, seed, step): the rows of step
k come from epoch (k-1) // steps_per_epoch shuffled with (seed, epoch), and dropout from (seed, k). A
checkpoint therefore needs only the step, the adapter and the optimizer moments to continue exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from . import distributed, planning
from .adapter import Adapter
from .chat import resolve_chat_template
from .checkpoint import check_writable
from .config import LoRAConfig, TrainingConfig, learning_rate_at
from .errors import CheckpointError, InvalidArgumentError, TrainingDivergedError, UnsupportedError
from .methods import TrainingMethod, default_method
from .model import BaseModel
from .run_data import RunData, fingerprint
from .reporting import MetricsLog, Progress, TrainingHistory, call_hooks, check_reporters, make_reporters, peak_rss_bytes, \
    plot_losses, write_adapter_config
from .signals import StopSignals
from .step import TrainingContext

log = logging.getLogger("ggml_lora.train")


class LoRATrainer:
    """Trains one LoRA adapter on one :class:`BaseModel` (supervised, or AdaLoRA with
    ``LoRAConfig(peft_type="adalora")``; PreferenceTrainer and GRPOTrainer bring their own method).

    >>> trainer = LoRATrainer(model, LoRAConfig(rank=8), TrainingConfig(epochs=3, output_dir="out"))
    >>> history = trainer.train("data.jsonl")
    >>> trainer.save_adapter("adapter.gguf")
    """

    def __init__(self, model: BaseModel, lora_config: LoRAConfig | None = None,
                 training_config: TrainingConfig | None = None, adapter: Adapter | None = None, *,
                 method: Callable[[LoRATrainer], TrainingMethod] | None = None):
        self.model = model
        self.lora_config = lora_config or (adapter.config if adapter is not None and adapter.config else LoRAConfig())
        self.config = training_config or TrainingConfig()
        if not isinstance(self.lora_config, LoRAConfig) or not isinstance(self.config, TrainingConfig):
            raise InvalidArgumentError("LoRATrainer(model, LoRAConfig(...), TrainingConfig(...))")
        if adapter is not None and adapter.model is not model:
            raise InvalidArgumentError("the adapter was made for another BaseModel")
        self.adapter = adapter if adapter is not None else Adapter.init(model, self.lora_config)
        self._own_adapter = adapter is None
        self.output_dir = Path(self.config.output_dir)
        self.global_step = 0
        self._ctx: TrainingContext | None = None
        self.signals = StopSignals()
        self._notes: list[str] = []          # said on the progress line once it exists
        # data parallelism over MPI (distributed.py): every rank runs this same loop on its share of the rows
        self.comm = distributed.communicator(self.config.distributed)
        self.reduced_bytes = 0               # bytes all-reduced by the last step (0 in one process)
        self.method: TrainingMethod | None = None
        try:
            self.method = (method or default_method(self.lora_config))(self)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Free the optimizer state, the method's own state and the adapter if this trainer made it."""
        if self._ctx is not None:
            self._ctx.close()
        if self.method is not None:
            self.method.close()
        if self._own_adapter:
            self.adapter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        # before anything is read or written: a closed adapter (or model) cannot train or save
        self.adapter._handle()

    # ---- what methods and helpers read ------------------------------------------------------------

    @property
    def is_main_process(self) -> bool:
        """Rank 0 of a distributed run (or the only process): the one that writes files and reports."""
        return self.comm.rank == 0

    @property
    def global_rows(self) -> int:
        """Rows per optimizer step over every process."""
        return self.config.rows_per_step * self.comm.size

    @property
    def stopping(self) -> bool:
        """A signal asked the run to stop after this step."""
        return self.signals.received is not None

    def chat_template(self) -> str | None:
        return resolve_chat_template(self.config.chat_template)

    def new_context(self, gradient_checkpointing: bool, f16_weights: bool) -> TrainingContext:
        """A training context (optimizer state, graphs) for one precision path and layout (planning.py
        chooses which)."""
        cfg = self.config
        return TrainingContext(self.adapter, optimizer=cfg.optimizer, dropout=self.lora_config.dropout,
                               gradient_checkpointing=gradient_checkpointing, f16_weights=f16_weights,
                               keep_transposed_weights=cfg.keep_transposed_weights)

    def note(self, message: str) -> None:
        """Say ``message`` on the progress line once the run starts."""
        self._notes.append(message)

    def adapter_metadata(self) -> dict:
        return {"step": self.global_step, "training_config": json.dumps(ckpt.trajectory(self), sort_keys=True)}

    def shard(self, chosen):
        """This process's part of a step's rows (distributed.shard), as the method's micro-batches."""
        return distributed.shard(self.comm, self.config.rows_per_step, chosen, self.method.micro_batches)

    def reduce(self, loss_sum: float) -> float:
        """Sum the gradient (float32) and the loss over the ranks; a signal any rank got stops them all
        after this same step."""
        self.reduced_bytes = self._ctx.allreduce_gradients(self.comm.allreduce)
        scalars = np.array([loss_sum, 1.0 if self.signals.pending else 0.0])
        self.comm.allreduce(scalars)
        self.reduced_bytes += scalars.nbytes
        if scalars[1] > 0:
            self.signals.agree()
        return float(scalars[0])

    # ---- public -----------------------------------------------------------------------------------

    def save_adapter(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the adapter as a llama.cpp GGUF LoRA (default: output_dir/adapter.gguf), atomically."""
        path = Path(path) if path is not None else self.output_dir / "adapter.gguf"
        self._check_open()
        try:
            return self.method.save_adapter(path, self.adapter_metadata())
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {e}; the adapter in memory is intact, "
                                  "save it elsewhere with trainer.save_adapter(path)") from e

    def evaluate(self, data, *, batch_size: int | None = None, adapter: bool = True,
                 f16_weights: bool = False) -> dict:
        """The method's validation metrics on ``data`` (a dataset source, or rows the method made);
        supervised: loss and perplexity. ``f16_weights``: through F16 copies of the quantized weights (see
        forward.loss_sum), not the stored blocks: faster on CPU, no longer llama.cpp's exact loss."""
        self._check_open()
        rows = self.method.eval_rows(data)
        return self.method.evaluate_rows(rows, batch_size or self.config.batch_size, adapter, f16_weights)

    def train(self, dataset, valid=None, callbacks: Sequence[Any] = (), resume_from=None) -> TrainingHistory:
        """Train on ``dataset`` (a path, a list of strings or a list of dicts); see TrainingConfig.

        Launched by MPI (``mpiexec -n N``), every rank calls this with the same arguments; an error on any
        rank ends every rank with its message (MPI_Abort) instead of leaving the others waiting."""
        if self.comm.size == 1:
            return self._train(dataset, valid, callbacks, resume_from)
        try:
            return self._train(dataset, valid, callbacks, resume_from)
        except BaseException as e:     # noqa: BLE001 - any failure must end every rank, not hang them
            self.comm.abort(f"{type(e).__name__}: {e}")

    # ---- the loop ---------------------------------------------------------------------------------

    def _train(self, dataset, valid, callbacks, resume_from) -> TrainingHistory:
        self._check_open()
        if self.comm.size > 1 and not self.method.distributable:
            raise UnsupportedError(f"{self.method.display_name or type(self).__name__} does not train over several "
                                   f"processes yet ({self.comm.size} were launched); run one process, or set "
                                   "distributed='none'")
        if resume_from is not None:         # resolved once: a folder's newest checkpoint may change later
            resume_from = ckpt.resolve_checkpoint(self.output_dir if resume_from is True else resume_from)
            ckpt.match_global_batch(self, resume_from)
        cfg, main = self.config, self.is_main_process
        if main:
            check_writable(self.output_dir)
        check_reporters(cfg.report_to)
        history = TrainingHistory()
        data = RunData.load(self, dataset, valid)
        history.data = {k: r.to_dict() for k, r in data.reports.items()}
        distributed.check_agreement(self, data.fingerprint, fingerprint(data.valid) if data.valid else "")
        history.total_steps = total = data.total

        planning.prepare(self)
        self.method.start(total)
        history.memory = planning.fit(self, data.longest)
        start = ckpt.restore_training(self, resume_from, data.fingerprint, total) if resume_from is not None else 0
        self.global_step = start
        next_batches = data.batches(start)
        reporters = []
        if main:        # rank 0 alone writes files and reports
            doc = write_adapter_config(self, data.reports, data.packing, total, data.steps_per_epoch)
            reporters = make_reporters(cfg.report_to, self.output_dir, cfg.logging_dir, doc,
                                       start if resume_from is not None else None, cfg.run_name)
        metrics = MetricsLog(self.output_dir / "metrics.jsonl", resume_step=start, enabled=main)
        callbacks = [*reporters, *callbacks]
        end_status = "FAILED"
        progress = Progress(total, start, cfg.progress and main, quiet=not main)
        for line in data.describe(self) + self._notes:
            progress.message(line)
        self._notes.clear()
        restore = self.signals.install(self.comm.size > 1)
        t0, tokens_seen, consecutive_skips = time.perf_counter(), 0, 0
        try:
            if data.valid and cfg.eval_every and start == 0:
                self._eval_and_report(data.valid, 0, metrics, history, callbacks, progress)
            self.model.placement(reset=True)     # each step's record tells where that step's work ran
            for step in range(start + 1, total + 1):
                lr = learning_rate_at(cfg, step, total)
                batches, n_tokens, n_step_tokens, epoch = next_batches(step)
                out = self.method.step(batches, lr, step, n_step_tokens)
                self.global_step = step
                tokens_seen += n_tokens              # tokens of the samples, padding not counted
                elapsed = time.perf_counter() - t0
                rec = {"type": "train", "step": step, "epoch": epoch, "loss": out.loss, "learning_rate": lr,
                       "grad_norm": out.grad_norm, "supervised_tokens": out.n_tokens,
                       "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
                       "elapsed_s": elapsed, "peak_rss_bytes": peak_rss_bytes(), **out.metrics}
                placement = self.model.placement(reset=True)
                rec["device_share"] = placement.device_share
                if history.placement is None:
                    history.placement = placement
                    planning.report_placement(placement, progress)
                if self.comm.size > 1:
                    rec["processes"], rec["allreduce_bytes"] = self.comm.size, self.reduced_bytes
                consecutive_skips = 0 if out.applied else consecutive_skips + 1
                if not out.applied:
                    self._skipped(rec, history, consecutive_skips, metrics, progress)
                metrics.write(rec)
                history.steps.append(rec)
                progress.step(rec)
                call_hooks(callbacks, "on_step", self, rec)

                if data.valid and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                    self._eval_and_report(data.valid, step, metrics, history, callbacks, progress)
                if not self.stopping and cfg.save_every and step % cfg.save_every == 0 and step != total:
                    history.checkpoint_path = self._save_checkpoint(step, data.fingerprint, total, callbacks)
                if self.stopping:
                    history.interrupted = self.signals.received
                    history.checkpoint_path = self._save_checkpoint(step, data.fingerprint, total, callbacks)
                    progress.message(f"{history.interrupted}: stopped after step {step}; checkpoint "
                                     f"{history.checkpoint_path} (resume with resume_from= / --resume)")
                    break
            else:
                if cfg.save_every:      # its replica check covers the adapter saved below
                    history.checkpoint_path = self._save_checkpoint(total, data.fingerprint, total, callbacks)
                else:
                    distributed.check_replicas(self, f"step {total}")
                history.adapter_path = self.save_adapter() if main else self.output_dir / "adapter.gguf"
                progress.message(f"adapter written: {history.adapter_path}")
            end_status = "KILLED" if history.interrupted else "FINISHED"
        finally:
            restore()
            progress.close()
            metrics.close()
            for r in reporters:
                r.close(end_status)
            if metrics.records and main:
                plot_losses(metrics.records, self.output_dir / "loss.png")
        history.global_step = self.global_step
        return history

    def _skipped(self, rec: dict, history: TrainingHistory, consecutive: int, metrics, progress) -> None:
        """A step whose loss or gradient was not finite: its update was not applied; nan_policy decides."""
        history.skipped_steps += 1
        rec["skipped"] = True
        step, cfg = rec["step"], self.config
        why = f"step {step}: loss {rec['loss']} / gradient norm {rec['grad_norm']} is not finite"
        if cfg.nan_policy == "stop":
            metrics.write(rec)
            last = ckpt.list_checkpoints(self.output_dir / "checkpoints")
            raise TrainingDivergedError(
                f"{why}; training stopped (nan_policy='stop'). "
                + (f"The last good checkpoint is {last[-1][1]}." if last else "No checkpoint was written yet.")
                + " Lower the learning rate, check the data, or use nan_policy='skip'.", step)
        progress.message(f"{why}: skipped ({history.skipped_steps} so far)")
        if consecutive >= cfg.max_skipped_steps:
            metrics.write(rec)
            raise TrainingDivergedError(f"{why}; {consecutive} consecutive steps skipped, giving up "
                                        "(max_skipped_steps)", step)

    def _eval_and_report(self, rows, step, metrics, history, callbacks, progress) -> None:
        t = time.perf_counter()
        rec = {"type": "eval", "step": step, **self.method.evaluate_rows(rows, self.config.batch_size),
               "eval_s": time.perf_counter() - t}
        self.model.placement(reset=True)       # evaluation's graphs are no training step's
        metrics.write(rec)
        history.evals.append(rec)
        progress.message(self.method.eval_message(rec))
        if self.is_main_process:
            plot_losses(metrics.records, self.output_dir / "loss.png")
        call_hooks(callbacks, "on_eval", self, rec)

    def _save_checkpoint(self, step: int, fingerprint: str, total: int, callbacks) -> Path:
        path = ckpt.save_training(self, step, fingerprint, total)
        call_hooks(callbacks, "on_save", self, path)
        return path


__all__ = ["LoRATrainer", "TrainingHistory", "check_writable", "resolve_chat_template"]
