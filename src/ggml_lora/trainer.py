"""LoRATrainer: the training loop a user runs: data, schedule, evaluation, checkpoints, resume.

Everything that decides the trajectory is a function of (configs, data, seed, step): the rows of step
k come from epoch (k-1) // steps_per_epoch shuffled with (seed, epoch), and dropout from (seed, k). A
checkpoint therefore needs only the step, the adapter and the optimizer moments to continue exactly.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import dataclasses
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from . import distributed, policy
from .adapter import Adapter
from .config import LoRAConfig, TrainingConfig, learning_rate_at, warmup_steps
from .errors import (
    CheckpointError,
    DistributedError,
    InvalidArgumentError,
    OutOfMemoryError,
    TrainingDivergedError,
    UnsupportedError,
)
from .model import BaseModel, Placement
from .reporting import MetricsLog, Progress, call_hooks, check_reporters, make_reporters, peak_rss_bytes, plot_losses
from .training import TrainingContext, loss_sum

# Config keys that change the trajectory: a resume with other values would not continue the same run.
_LORA_TRAJECTORY_KEYS = ("rank", "alpha", "use_rslora", "dropout", "rank_pattern", "alpha_pattern", "peft_type",
                         "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                         "total_step")
_TRAJECTORY_KEYS = ("batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "warmup_steps",
                    "warmup_ratio", "optimizer", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
                    "max_grad_norm", "max_seq_length", "truncation", "packing", "train_on_prompt", "seed")
# batch_size and gradient_accumulation_steps may change on resume as long as the rows per optimizer step
# (times the processes) stay the same: the same data, order and update (see _match_global_batch)
_BATCH_KEYS = ("batch_size", "gradient_accumulation_steps")
STATE_VERSION = 1
log = logging.getLogger("ggml_lora.train")


@dataclass
class TrainingHistory:
    """What ``train`` did. ``steps``/``evals`` are the records also written to metrics.jsonl."""

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    global_step: int = 0
    total_steps: int = 0
    interrupted: str | None = None          # "SIGINT" / "SIGTERM" when stopped by a signal
    skipped_steps: int = 0
    adapter_path: Path | None = None        # the final adapter (None when interrupted)
    checkpoint_path: Path | None = None     # the newest checkpoint written
    data: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)   # the estimate checked before the first step (bytes)
    placement: Placement | None = None      # where the first step's work ran (device vs the CPU fallback)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.steps]


def _fingerprint(rows) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r.tokens, dtype=np.int32).tobytes())
        h.update(np.packbits(np.asarray(r.mask, dtype=bool)).tobytes())
    return h.hexdigest()[:16]


def resolve_chat_template(value: str | None) -> str | None:
    """A chat template given as Jinja text, the path of a file holding it, or a built-in's name
    (chat.BUILTIN_TEMPLATES: chatml, gemma, llama3)."""
    from .chat import BUILTIN_TEMPLATES

    if value is None or "{" in value:
        return value
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise InvalidArgumentError(f"chat_template={value!r} is neither a Jinja template, a file nor a built-in "
                                   f"({', '.join(BUILTIN_TEMPLATES)})")
    return path.read_text()


def check_writable(directory: Path) -> None:
    """Fail before training if ``directory`` cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output_dir {directory} is not writable ({e.strerror or e}); "
                              "choose another with output_dir= / --output-dir") from e


class LoRATrainer:
    """Trains one LoRA adapter on one :class:`BaseModel`.

    >>> trainer = LoRATrainer(model, LoRAConfig(rank=8), TrainingConfig(epochs=3, output_dir="out"))
    >>> history = trainer.train("data.jsonl")
    >>> trainer.save_adapter("adapter.gguf")
    """

    _distributable = True                    # trains over several MPI processes (see distributed.py)

    def __init__(self, model: BaseModel, lora_config: LoRAConfig | None = None,
                 training_config: TrainingConfig | None = None, adapter: Adapter | None = None):
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
        self.adalora = None                  # the AdaLoRA state (adalora.AdaLoRA) once train() starts
        if self.lora_config.peft_type == "adalora" and adapter is not None:
            raise InvalidArgumentError("AdaLoRA trains its own adapter: pass LoRAConfig(peft_type='adalora'), "
                                       "not adapter=")
        self._signal: str | None = None
        self._pending_signal: str | None = None   # data parallel: a signal this rank got, not yet agreed on
        self._notes: list[str] = []          # said on the progress line once it exists
        # data parallelism over MPI (distributed.py): every rank runs this same loop on its share of the rows
        self.comm = distributed.communicator(self.config.distributed)
        self.reduced_bytes = 0               # bytes all-reduced by the last step (0 in one process)
        self._step_metrics: dict = {}        # a subclass's metrics of the last step, logged with it

    def close(self) -> None:
        """Free the optimizer state, and the adapter if this trainer made it (idempotent)."""
        if self._ctx is not None:
            self._ctx.close()
        if self._own_adapter:
            self.adapter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        # before anything is read or written: a closed adapter (or model) cannot train or save
        self.adapter._handle()

    # ---- public -----------------------------------------------------------------------------------

    def save_adapter(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the adapter as a llama.cpp GGUF LoRA (default: output_dir/adapter.gguf), atomically."""
        path = Path(path) if path is not None else self.output_dir / "adapter.gguf"
        self._check_open()
        try:
            if self.adalora is not None:
                return self._save_adalora(path)
            return self.adapter.save(path, metadata=self._adapter_metadata())
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {e}; the adapter in memory is intact, "
                                  "save it elsewhere with trainer.save_adapter(path)") from e

    def _save_adalora(self, path: Path) -> Path:
        """The kept triplets as an ordinary llama.cpp LoRA, a rank per tensor (see adalora.py)."""
        tensors, alpha = self.adalora.file_tensors()
        if not tensors:
            raise InvalidArgumentError("AdaLoRA kept no triplet in any module: nothing to save")
        meta = {**self._adapter_metadata(), "adalora_ranks": json.dumps(self.adalora.ranks(), sort_keys=True)}
        with Adapter.from_tensors(self.model, tensors, alpha) as final:
            final.config = self.lora_config
            return final.save(path, metadata=meta)

    def evaluate(self, data, *, batch_size: int | None = None, adapter: bool = True,
                 f16_weights: bool = False) -> dict:
        """Validation loss and perplexity of ``data`` (a dataset source or a list of Samples).
        ``f16_weights``: through F16 copies of the quantized weights (see training.loss_sum), not the
        stored blocks: faster on CPU, no longer llama.cpp's exact loss."""
        from .data import Sample, make_rows

        self._check_open()
        samples = data if data and isinstance(data, list) and isinstance(data[0], Sample) else self._load(data)[0]
        rows = make_rows(samples, max_seq_length=self.config.max_seq_length, packing=False, seed=self.config.seed)
        return self._evaluate_rows(rows, batch_size or self.config.batch_size, adapter, f16_weights)

    @property
    def is_main_process(self) -> bool:
        """Rank 0 of a distributed run (or the only process): the one that writes files and reports."""
        return self.comm.rank == 0

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

    def _train(self, dataset, valid, callbacks, resume_from) -> TrainingHistory:
        self._check_open()
        if self.comm.size > 1 and (self.lora_config.peft_type == "adalora" or not self._distributable):
            raise UnsupportedError(f"{'AdaLoRA' if self.lora_config.peft_type == 'adalora' else type(self).__name__}"
                                   f" does not train over several processes yet ({self.comm.size} were launched); "
                                   "run one process, or set distributed='none'")
        if resume_from is not None:         # resolved once: a folder's newest checkpoint may change later
            resume_from = ckpt.resolve_checkpoint(self.output_dir if resume_from is True else resume_from)
            self._match_global_batch(resume_from)
        cfg = self.config
        self._global_rows = cfg.rows_per_step * self.comm.size
        if self.is_main_process:
            check_writable(self.output_dir)
        check_reporters(cfg.report_to)
        history = TrainingHistory()
        if cfg.streaming:
            stream, valid_samples, reports = self._load_streaming(dataset, valid)
            packing, rows, steps_per_epoch = False, None, None
            fingerprint = _fingerprint(r for _, r in itertools.islice(stream(), 64))
            total = cfg.max_steps
        else:
            train_samples, valid_samples, reports = self._load(dataset, valid)
            packing = cfg.packing if cfg.packing is not None else reports["train"].format == "text"
            rows = self._rows(train_samples, packing)
            if not rows:
                raise InvalidArgumentError("the training data holds no usable samples")
            steps_per_epoch = self._steps_per_epoch(len(rows))
            total = cfg.max_steps or cfg.epochs * steps_per_epoch
            fingerprint = _fingerprint(rows)
        history.data = {k: r.to_dict() for k, r in reports.items()}
        valid_rows = self._rows(valid_samples, packing) if valid_samples else []
        self._check_agreement(fingerprint, _fingerprint(valid_rows) if valid_rows else "")
        history.total_steps = total

        if self._ctx is not None:
            self._ctx.close()
        self._set_bf16()
        self._ctx = self._context(cfg.gradient_checkpointing, self._auto_f16_candidate()
                                  if cfg.f16_weights is None else cfg.f16_weights)
        if self.lora_config.peft_type == "adalora" and (self.adalora is None or self.adalora.total_step !=
                                                        (self.lora_config.total_step or total)):
            from .adalora import AdaLoRA

            self.adalora = AdaLoRA(self.adapter, self.lora_config, total)
        seq_len = cfg.max_seq_length if rows is None else self._longest(rows)
        if cfg.f16_weights is None:
            self._choose_f16_weights(seq_len)
        history.memory = self._check_memory(seq_len)
        start = 0
        if resume_from is not None:
            start = self._resume(resume_from, fingerprint, total)
        self.global_step = start
        if cfg.streaming:
            # the rows of the steps already taken are read again and skipped: the stream is deterministic
            streamed = itertools.islice(stream(), start * self._global_rows, None)

            def next_batches(step):
                return self._stream_batches(streamed)
        else:
            def next_batches(step):
                return self._step_batches(rows, step, steps_per_epoch)
        main = self.is_main_process
        reporters = []
        if main:        # rank 0 alone writes files and reports
            doc = self._write_config(reports, packing, total, steps_per_epoch)
            reporters = make_reporters(cfg.report_to, self.output_dir, cfg.logging_dir, doc,
                                       start if resume_from is not None else None, cfg.run_name)
        metrics = MetricsLog(self.output_dir / "metrics.jsonl", resume_step=start, enabled=main)
        callbacks = [*reporters, *callbacks]
        end_status = "FAILED"
        progress = Progress(total, start, cfg.progress and main, quiet=not main)
        for split, report in reports.items():
            progress.message(f"{split}: {report.source} (read as training goes)" if rows is None and split == "train"
                             else f"{split}: {report}")
        for note in self._notes:
            progress.message(note)
        self._notes.clear()
        per_step = f"{self._global_rows} rows"
        if self.comm.size > 1:
            per_step += (f" ({self.comm.size} processes x {cfg.rows_per_step}, {self.model.n_threads or 'default'} "
                         "threads each)")
        if rows is None:
            progress.message(f"training {self.adapter.n_parameters:,} LoRA parameters on a stream: {total} steps of "
                             f"{per_step}")
        else:
            progress.message(f"training {self.adapter.n_parameters:,} LoRA parameters on {len(rows)} rows "
                             f"({reports['train'].n_supervised:,} supervised tokens): {total} steps of "
                             f"{per_step}, {steps_per_epoch} steps per epoch")
        ckpt_root = self.output_dir / "checkpoints"
        restore = self._install_signal_handlers()
        t0, tokens_seen, consecutive_skips = time.perf_counter(), 0, 0
        try:
            if valid_rows and cfg.eval_every and start == 0:
                self._eval_and_report(valid_rows, 0, metrics, history, callbacks, progress)
            self.model.placement(reset=True)     # each step's record tells where that step's work ran
            for step in range(start + 1, total + 1):
                lr = learning_rate_at(cfg, step, total)
                batches, n_tokens, n_step_tokens, epoch = next_batches(step)
                loss, n_tok, norm, applied = self._train_step(batches, lr, step, n_step_tokens)
                self.global_step = step
                tokens_seen += n_tokens              # tokens of the samples, padding not counted
                elapsed = time.perf_counter() - t0
                rec = {"type": "train", "step": step, "epoch": epoch, "loss": loss,
                       "learning_rate": lr, "grad_norm": norm, "supervised_tokens": n_tok,
                       "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
                       "elapsed_s": elapsed, "peak_rss_bytes": peak_rss_bytes()}
                rec.update(self._step_metrics)
                placement = self.model.placement(reset=True)
                rec["device_share"] = placement.device_share
                if history.placement is None:
                    history.placement = placement
                    self._report_placement(placement, progress)
                if self.comm.size > 1:
                    rec["processes"], rec["allreduce_bytes"] = self.comm.size, self.reduced_bytes
                if self.adalora is not None:
                    rec["orth_loss"] = self.adalora.orth_loss
                    rec["budget"] = int(sum(self.adalora.ranks().values()))
                if not applied:
                    history.skipped_steps += 1
                    consecutive_skips += 1
                    rec["skipped"] = True
                    why = f"step {step}: loss {loss} / gradient norm {norm} is not finite"
                    if cfg.nan_policy == "stop":
                        metrics.write(rec)
                        last = ckpt.list_checkpoints(ckpt_root)
                        raise TrainingDivergedError(
                            f"{why}; training stopped (nan_policy='stop'). "
                            + (f"The last good checkpoint is {last[-1][1]}." if last else "No checkpoint was written yet.")
                            + " Lower the learning rate, check the data, or use nan_policy='skip'.", step)
                    progress.message(f"{why}: skipped ({history.skipped_steps} so far)")
                    if consecutive_skips >= cfg.max_skipped_steps:
                        metrics.write(rec)
                        raise TrainingDivergedError(f"{why}; {consecutive_skips} consecutive steps skipped, giving up "
                                                    "(max_skipped_steps)", step)
                else:
                    consecutive_skips = 0
                metrics.write(rec)
                history.steps.append(rec)
                progress.step(rec)
                call_hooks(callbacks, "on_step", self, rec)

                if valid_rows and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                    self._eval_and_report(valid_rows, step, metrics, history, callbacks, progress)
                if self._signal is None and cfg.save_every and step % cfg.save_every == 0 and step != total:
                    history.checkpoint_path = self._save_checkpoint(step, fingerprint, total, callbacks)
                if self._signal is not None:
                    history.interrupted = self._signal
                    history.checkpoint_path = self._save_checkpoint(step, fingerprint, total, callbacks)
                    progress.message(f"{self._signal}: stopped after step {step}; checkpoint "
                                     f"{history.checkpoint_path} (resume with resume_from= / --resume)")
                    break
            else:
                if cfg.save_every:      # its replica check covers the adapter saved below
                    history.checkpoint_path = self._save_checkpoint(total, fingerprint, total, callbacks)
                else:
                    self._check_replicas(f"step {total}")
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

    # ---- data -------------------------------------------------------------------------------------

    def _load(self, dataset, valid=None):
        from .data import load_splits

        cfg = self.config
        return load_splits(dataset, self.model, valid=valid, valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                           max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                           train_on_prompt=cfg.train_on_prompt, chat_template=resolve_chat_template(cfg.chat_template))

    def _rows(self, samples, packing: bool):
        from .data import make_rows

        cfg = self.config
        return make_rows(samples, max_seq_length=cfg.max_seq_length, packing=packing, seed=cfg.seed)

    @staticmethod
    def _longest(rows) -> int:
        return max(len(r.tokens) for r in rows)

    def _steps_per_epoch(self, n_rows: int) -> int:
        """Optimizer steps that one pass over ``n_rows`` rows takes (a method may take its rows otherwise)."""
        return math.ceil(n_rows / self._global_rows)

    def _step_batches(self, rows, step: int, steps_per_epoch: int):
        cfg, n = self.config, self._global_rows
        epoch, j = divmod(step - 1, steps_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(rows))
        chosen = [rows[i] for i in order[j * n:(j + 1) * n]]
        return (*self._shard(chosen), (step - 1) / steps_per_epoch)

    def _stream_batches(self, streamed):
        taken = list(itertools.islice(streamed, self._global_rows))
        return (*self._shard([row for _, row in taken]), taken[0][0])

    def _shard(self, chosen):
        """(this process's micro-batches of the step's rows, the tokens of all of them, the supervised tokens
        of all of them or None in one process). Rank r takes the r-th run of batch_size ×
        gradient_accumulation_steps rows: its micro-batches are those one process would make there."""
        if self.comm.size == 1:
            return (*self._micro_batches(chosen), None)
        from .data import n_targets

        per = self.config.rows_per_step
        first = self.comm.rank * per
        mine = self._micro_batches(chosen[first:first + per], first_key=first)[0]
        return mine, sum(len(r.tokens) for r in chosen), sum(n_targets(r) for r in chosen)

    def _micro_batches(self, chosen, first_key: int = 0):
        """(the rows collated batch_size at a time, their tokens without padding). Without dropout, a
        micro-batch's rows go end to end in one sequence (collate's pack: no padding, the same
        gradients); with it, each row's dropout masks are keyed by its place in the step (first_key + i),
        not by its micro-batch or padding, so each row keeps a sequence of its own."""
        from .data import collate

        size = self.config.batch_size
        pack = self.lora_config.dropout == 0
        keys = None if pack else np.arange(first_key, first_key + len(chosen))
        return ([collate(chosen[i:i + size], self.model, seq_keys=None if pack else keys[i:i + size], pack=pack)
                 for i in range(0, len(chosen), size)],
                sum(len(r.tokens) for r in chosen))

    def _load_streaming(self, dataset, valid):
        """(a function that starts the training stream, validation samples, reports) for streaming=True."""
        from .data import load_dataset, own_validation, stream_rows, stream_samples

        cfg = self.config
        kw = dict(max_seq_length=cfg.max_seq_length, truncation=cfg.truncation, train_on_prompt=cfg.train_on_prompt,
                  chat_template=resolve_chat_template(cfg.chat_template))
        own = own_validation(dataset, valid, 0.0)
        reports = {}
        valid_samples = []
        if own or valid is not None:
            valid_samples, reports["valid"] = (load_dataset(dataset, self.model, split="valid", **kw) if own
                                               else load_dataset(valid, self.model, **kw))
        reports["train"], _ = stream_samples(dataset, self.model, **kw)     # checks the source; read lazily
        reports = {"train": reports.pop("train"), **reports}
        reports["train"].source += f" (streamed, shuffled in windows of {cfg.shuffle_buffer} rows)"

        def stream():
            return stream_rows(dataset, self.model, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, **kw)
        return stream, valid_samples, reports

    # ---- step and evaluation ----------------------------------------------------------------------

    def _train_step(self, batches, lr: float, step: int,
                    n_step_tokens: int | None = None) -> tuple[float, int, float, bool]:
        """Forward + backward over the micro-batches, then clip and update unless anything is not finite.
        Data parallel: ``n_step_tokens`` supervised tokens in every process's micro-batches together."""
        cfg = self.config
        run = self._ctx.step if self.adalora is None else functools.partial(self.adalora.step, self._ctx)
        kw = {} if self.comm.size == 1 else {"n_step_tokens": n_step_tokens, "reduce": self._reduce}
        res = run(batches, lr, step, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or None,
                  dropout_seed=cfg.seed * 1_000_003 + step, **kw)
        return res.loss, res.n_tokens, res.grad_norm, not res.skipped

    def _reduce(self, loss_sum: float) -> float:
        """Sum the gradient (float32) and the loss over the ranks; a signal any rank got stops them all
        after this same step."""
        self.reduced_bytes = self._ctx.allreduce_gradients(self.comm.allreduce)
        scalars = np.array([loss_sum, 1.0 if self._pending_signal else 0.0])
        self.comm.allreduce(scalars)
        self.reduced_bytes += scalars.nbytes
        if scalars[1] > 0 and self._signal is None:
            self._signal = self._pending_signal or "SIGTERM"
        return float(scalars[0])

    def _evaluate_rows(self, rows, batch_size: int, use_adapter: bool = True, f16_weights: bool = False) -> dict:
        from .data import collate

        total, count = 0.0, 0
        adapter = self.adapter if use_adapter else None
        starts = range(0, len(rows), batch_size)[self.comm.rank::self.comm.size]   # ranks share the batches
        for i in starts:
            batch = collate(rows[i:i + batch_size], self.model, pack=True)
            total += loss_sum(self.model, adapter, batch, f16_weights=f16_weights)
            count += batch.n_loss
            if self._signal is not None:
                break
        if self.comm.size > 1:
            sums = np.array([total, count], dtype=np.float64)
            self.comm.allreduce(sums)
            total, count = float(sums[0]), int(sums[1])
        loss = total / count if count else math.nan
        return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < 700 else math.inf, "val_tokens": count}

    def _eval_and_report(self, rows, step, metrics, history, callbacks, progress) -> None:
        t = time.perf_counter()
        rec = {"type": "eval", "step": step, **self._evaluate_rows(rows, self.config.batch_size),
               "eval_s": time.perf_counter() - t}
        self.model.placement(reset=True)       # evaluation's graphs are no training step's
        metrics.write(rec)
        history.evals.append(rec)
        progress.message(f"step {step}: validation loss {rec['val_loss']:.4f}"
                         + (f", perplexity {rec['val_ppl']:.2f}" if "val_ppl" in rec else ""))
        if self.is_main_process:
            plot_losses(metrics.records, self.output_dir / "loss.png")
        call_hooks(callbacks, "on_eval", self, rec)

    def _check_memory(self, seq_len: int) -> dict:
        """Estimate the peak of a step before running one; refuse when it cannot fit. When the one-graph
        step does not fit (or its graph cannot be built at this length) and gradient checkpointing would,
        switch checkpointing on and say so: same gradients, about a third more compute."""
        cfg = self.config
        try:
            est = self._estimate(seq_len)
            short = self._shortfall(est)
        except UnsupportedError as e:
            if self._ctx.gradient_checkpointing:
                raise
            est, short, why = None, None, str(e)
        else:
            why = None if short is None else f"needs about {short[0] / 2**30:.2f} GiB more than {short[2]}"
        if why is not None and not self._ctx.gradient_checkpointing:
            ctx = self._context(True, self._ctx.f16_weights)
            ckpt_est = self._estimate(seq_len, ctx)
            if self._shortfall(ckpt_est) is None:
                self._ctx.close()
                self._ctx = ctx
                self._notes.append(f"gradient checkpointing switched on: a one-graph step of {cfg.batch_size} x "
                                   f"{seq_len} tokens {why}; with checkpointing the estimated peak is "
                                   f"{ckpt_est['total'] / 2**30:.2f} GiB (same gradients, about a third more "
                                   "compute; set gradient_checkpointing=True to say so yourself)")
                log.warning("%s", self._notes[-1])
                return ckpt_est
            ctx.close()
        if est is None:
            raise UnsupportedError(why)
        if short is not None:
            to_come, budget, what = short
            gib = {k: round(v / 2**30, 3) for k, v in est.items()}
            hints = ["lower batch_size (use gradient_accumulation_steps to keep the step size)", "lower max_seq_length"]
            if self._ctx.f16_weights:
                hints.append("set f16_weights=False")
            if cfg.keep_transposed_weights:
                hints.append("set keep_transposed_weights=False")
            raise OutOfMemoryError(
                f"a training step of {cfg.batch_size} x {seq_len} tokens needs about {to_come / 2**30:.2f} GiB more "
                f"(estimated peak {gib['total']} GiB: {', '.join(f'{k} {v}' for k, v in gib.items() if k != 'total')})"
                f", but only {max(budget, 0) / 2**30:.2f} GiB is {what}"
                + (" even with gradient checkpointing" if not cfg.gradient_checkpointing else "")
                + f". To fit: {'; '.join(hints)}.")
        return est

    def _context(self, gradient_checkpointing: bool, f16_weights: bool) -> TrainingContext:
        cfg = self.config
        return TrainingContext(self.adapter, optimizer=cfg.optimizer, dropout=self.lora_config.dropout,
                               gradient_checkpointing=gradient_checkpointing, f16_weights=f16_weights,
                               keep_transposed_weights=cfg.keep_transposed_weights)

    def _set_bf16(self) -> None:
        """bf16=None: products on AMX tiles where every process's CPU has them (an order of magnitude faster
        there than ggml's F16 or BF16 kernels); True where one has none: the model's UnsupportedError."""
        on = self.config.bf16
        if on is None:
            on = policy.amx_bf16_applies(self.model.device)
            if self.comm.size > 1:
                on = all(self.comm.allgather(on))
            if on:
                log.info("bf16: products through the frozen weights on AMX tiles in bfloat16 "
                         "(bf16=False keeps F16 copies and ggml's kernels)")
        self.model.set_bf16(on)

    def _report_placement(self, placement: Placement, progress: Progress) -> None:
        """One line on where the first step ran; a warning when part of it fell back to the CPU."""
        progress.message(f"placement: {placement.line()}")
        warning = policy.fallback_warning(placement.device, placement.device_share, placement.cpu_ops)
        if warning:
            log.warning(warning)

    def _auto_f16_candidate(self) -> bool:
        """f16_weights=None may choose F16 copies only on a CPU (where ggml's F16 products beat its
        quantized ones; measured in benchmarks/README.md) and for a model with quantized matrices."""
        return policy.f16_copies_may_help(self.model.device)

    def _choose_f16_weights(self, seq_len: int) -> None:
        """f16_weights=None: keep the F16 copies (faster on CPU) only when they take at most a quarter of the
        memory available and the step's whole estimated peak at most half, so the copies never decide
        whether a model fits; otherwise train on the stored blocks. Every process must choose alike."""
        chosen = False
        quantized = any(t.type_name != "F32" and len(t.shape) == 2 for t in self.model.tensors.values())
        if self._ctx.f16_weights and self.model.bf16 and quantized:
            chosen = True               # no copies: the AMX products read the stored blocks (BaseModel.set_bf16)
            log.info("f16_weights: the training forward multiplies the stored blocks on AMX tiles in bfloat16 "
                     "(no copies); f16_weights=False keeps llama.cpp's kernels for it")
        elif self._ctx.f16_weights:
            est = self._estimate(seq_len)
            total = sum(v for k, v in est.items() if k != "total")
            if self.config.memory_limit_gib is not None:
                budget = int(self.config.memory_limit_gib * 2**30)
            else:
                free = policy.available_memory(self.model.device)
                # the weights, adapter and working copies that exist already are not in MemAvailable
                budget = None if free is None else free + est["weights"] + est["adapter"]
            chosen = est["f16_weights"] > 0 and budget is not None and \
                4 * est["f16_weights"] <= budget and 2 * total <= budget
            if chosen:
                log.info("f16_weights: training through F16 copies of the quantized weights (%.2f GiB; the step's "
                         "estimated peak %.2f GiB of %.2f GiB); f16_weights=False trains on the stored blocks",
                         est["f16_weights"] / 2**30, total / 2**30, budget / 2**30)
        if self.comm.size > 1:
            chosen = all(self.comm.allgather(chosen))
        if chosen != self._ctx.f16_weights:
            self._ctx.close()
            self._ctx = self._context(self.config.gradient_checkpointing, chosen)

    # Methods whose loss weights each row (preference, GRPO) keep a weighted copy of the logits' gradient:
    # n_vocab x loss rows in F32, or with checkpointing one LM-head chunk of about 64 MiB.
    weights_loss_rows = False

    def _estimate(self, seq_len: int, ctx: TrainingContext | None = None) -> dict:
        ctx = ctx or self._ctx
        est = ctx.measure(self.config.batch_size, seq_len)
        if self.weights_loss_rows:
            extra = self.model.n_vocab * self.config.batch_size * (seq_len - 1) * 4
            est["compute"] += min(extra, 64 << 20) if ctx.gradient_checkpointing else extra
        est["total"] = sum(est.values())
        gib = {k: round(v / 2**30, 3) for k, v in est.items()}
        log.info("estimated peak memory of a step: %.2f GiB (%s)", gib["total"],
                 ", ".join(f"{k} {v}" for k, v in gib.items() if k != "total"))
        return est

    def _shortfall(self, est: dict) -> tuple[int, int, str] | None:
        """(bytes still to come, bytes available, where) when the step does not fit; None when it does."""
        cfg = self.config
        # the weights, the adapter and the working copies exist by now; the rest is still to come
        to_come = est["total"] - est["weights"] - est["adapter"] - est["transposed"] - est["f16_weights"]
        if cfg.memory_limit_gib is not None:
            budget, what = int(cfg.memory_limit_gib * 2**30) - (est["total"] - to_come), "memory_limit_gib"
        else:
            budget, what = policy.available_memory(self.model.device), f"available on {self.model.device}"
        if budget is not None and to_come > budget:
            return to_come, budget, what
        return None

    # ---- checkpoints ------------------------------------------------------------------------------

    def _adapter_metadata(self) -> dict:
        return {"step": self.global_step, "training_config": json.dumps(self._trajectory(), sort_keys=True)}

    def _trajectory(self) -> dict:
        d = self.config.to_dict()
        return {k: d[k] for k in _TRAJECTORY_KEYS}

    def _checkpoint_state(self) -> dict:
        """What a subclass adds to a checkpoint's state (JSON)."""
        return {}

    def _save_checkpoint(self, step: int, fingerprint: str, total: int, callbacks) -> Path:
        root = self.output_dir / "checkpoints"
        self._check_replicas(f"step {step}")
        if self.is_main_process:
            state = {"version": STATE_VERSION, "step": step, "total_steps": total, "data_fingerprint": fingerprint,
                     "training_config": self.config.to_dict(), "lora_config": self.lora_config.to_dict(),
                     "targets": list(self.adapter.targets), "optimizer": self._ctx.optimizer,
                     "base_model_sha256": self.model.sha256, "world_size": self.comm.size,
                     "global_batch_size": self._global_rows, **self._checkpoint_state()}
            path = ckpt.write_checkpoint(root, step, self.adapter, self._ctx, state, self._adapter_metadata(),
                                         extra=self.adalora.state_arrays() if self.adalora is not None else None)
            ckpt.prune_checkpoints(root, self.config.save_total_limit)
        else:
            path = root / f"checkpoint-{step}"
        call_hooks(callbacks, "on_save", self, path)
        return path

    # ---- data parallelism -------------------------------------------------------------------------

    def _check_agreement(self, fingerprint: str, valid_fingerprint: str) -> None:
        """Every rank must train the same base model on the same data with the same settings."""
        if self.comm.size == 1:
            return
        local = ("n_threads", "device", "progress", "report_to", "logging_dir", "run_name")   # may differ per host
        settings = [{k: v for k, v in self.config.to_dict().items() if k not in local}, self.lora_config.to_dict()]
        mine = {"data": fingerprint, "validation data": valid_fingerprint, "base model": self.model.sha256,
                "settings": distributed.digest([np.frombuffer(json.dumps(settings, sort_keys=True, default=str)
                                                              .encode(), np.uint8)])}
        everyone = self.comm.allgather(mine)
        differ = [k for k in mine if len({e[k] for e in everyone}) > 1]
        if differ:
            raise DistributedError(f"the {self.comm.size} processes disagree on their {', '.join(differ)}: "
                                   + "; ".join(f"rank {r}: " + ", ".join(f"{k} {e[k][:12]}" for k in differ)
                                               for r, e in enumerate(everyone))
                                   + ". Launch every rank with the same model, data and options")

    def _check_replicas(self, where: str) -> None:
        """Every rank must hold the same adapter, bit for bit (a hash of each rank's A and B, gathered)."""
        if self.comm.size == 1:
            return
        h = distributed.digest(x for t in self.adapter.targets for x in self.adapter.get(t))
        everyone = self.comm.allgather(h)
        if len(set(everyone)) > 1:
            raise DistributedError(f"{where}: the ranks' adapters differ ("
                                   + ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(everyone))
                                   + "); their steps no longer agree, training stopped. The last checkpoint is "
                                   "loadable; report this with the launch command")

    def _match_global_batch(self, path: Path) -> None:
        """A resume continues the checkpoint's run: the same rows per optimizer step. With another number
        of processes, gradient_accumulation_steps is chosen to keep them (the step's rows, their order and
        the update are then the same), or the resume is refused naming what would fit."""
        state = ckpt.read_state(path)
        saved_cfg = state.get("training_config") or {}
        saved_world = int(state.get("world_size", 1))
        saved = int(state.get("global_batch_size") or saved_cfg.get("batch_size", 0) *
                    saved_cfg.get("gradient_accumulation_steps", 0))
        cfg, size = self.config, self.comm.size
        if saved == cfg.rows_per_step * size:
            return
        per = cfg.batch_size * size
        if saved_world != size and saved % per == 0:
            accum = saved // per
            self._notes.append(f"resuming a {saved_world}-process run on {size}: gradient_accumulation_steps "
                               f"{cfg.gradient_accumulation_steps} -> {accum} keeps its {saved} rows per step")
            self.config = dataclasses.replace(cfg, gradient_accumulation_steps=accum)
            return
        raise CheckpointError(f"checkpoint {path} was trained with {saved} rows per optimizer step ({saved_world} "
                              f"process(es) x batch_size x gradient_accumulation_steps); this run has "
                              f"{cfg.rows_per_step * size} ({size} x {cfg.batch_size} x "
                              f"{cfg.gradient_accumulation_steps}); resuming needs processes x batch_size x "
                              f"gradient_accumulation_steps = {saved}")

    def _resume(self, path: Path, fingerprint: str, total: int) -> int:
        """Load checkpoint ``path`` (resolved by train) into the adapter and optimizer; returns its step."""
        state, moments, extra = ckpt.read_checkpoint(path)
        trained_b = {k[:-2]: v for k, v in extra.items() if k.endswith("/b") and not k.startswith("adalora/")}
        where = f"checkpoint {path}"
        if state.get("base_model_sha256") != self.model.sha256:
            raise CheckpointError(f"{where} was trained on another base model (sha256 differs)")
        if sorted(state.get("targets", [])) != sorted(self.adapter.targets):
            raise CheckpointError(f"{where} adapts other modules than this LoRAConfig")
        saved = state.get("training_config", {})
        changed = [k for k in _TRAJECTORY_KEYS if k not in _BATCH_KEYS and saved.get(k) != getattr(self.config, k)]
        if changed:
            raise CheckpointError(f"{where}: resuming with other values of {', '.join(changed)} would not continue "
                                  f"the same run (saved: {', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")
        saved_lora, lora = state.get("lora_config") or {}, self.lora_config.to_dict()
        differ = [k for k in _LORA_TRAJECTORY_KEYS if k in saved_lora and saved_lora[k] != lora[k]]
        if differ:
            raise CheckpointError(f"{where} was trained with other LoRA settings: "
                                  + ", ".join(f"{k}={saved_lora[k]!r} (now {lora[k]!r})" for k in differ))
        if state.get("data_fingerprint") != fingerprint:
            raise CheckpointError(f"{where} was trained on other data (the tokenized rows differ)")
        step = int(state["step"])
        if step > total:
            raise CheckpointError(f"{where} is at step {step}, past the {total} steps of this configuration")
        loaded = Adapter.load(self.model, path / ckpt.ADAPTER_FILE)
        try:
            for t in self.adapter.targets:
                a, b = loaded.get(t)
                if t in self.adapter.pair_scales and t not in trained_b:
                    raise CheckpointError(f"{where} lacks the trained lora_b of {t} (a pair with its own scale)")
                self.adapter.set(t, lora_a=a, lora_b=trained_b.get(t, b))
        finally:
            loaded.close()
        if self._ctx.optimizer == "adamw":
            self._ctx.set_moments(moments)
        if self.adalora is not None:
            self.adalora.load_state_arrays(extra, where)
        return step

    def _config_extra(self) -> dict:
        """What a subclass adds to adapter_config.json."""
        return {}

    def _write_config(self, reports, packing: bool, total: int, steps_per_epoch: int) -> dict:
        from . import __version__
        from .adapter_file import atomic_path

        doc = {"ggml_lora_version": __version__, "base_model": str(self.model.path),
               "base_model_sha256": self.model.sha256, "lora": self.lora_config.to_dict(),
               "training": self.config.to_dict(), "resolved": {"packing": packing, "total_steps": total,
                                                               "steps_per_epoch": steps_per_epoch,
                                                               "warmup_steps": warmup_steps(self.config, total),
                                                               "file_alpha": self.adapter.alpha,
                                                               "processes": self.comm.size,
                                                               "f16_weights": self._ctx.f16_weights,
                                                               "bf16": self.model.bf16,
                                                               "global_batch_size": self._global_rows},
               "data": {k: r.to_dict() for k, r in reports.items()}, **self._config_extra()}
        with atomic_path(self.output_dir / "adapter_config.json") as tmp:
            tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        return doc

    # ---- signals ----------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        """SIGINT/SIGTERM finish the current step, write a checkpoint and return; a second SIGINT aborts."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        self._pending_signal = None

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if (self._signal is not None or self._pending_signal is not None) and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.comm.size > 1:
                self._pending_signal = name      # the ranks agree on it at the end of the step (_reduce)
            else:
                self._signal = name

        for s in previous:
            signal.signal(s, handler)

        def restore():
            for s, h in previous.items():
                signal.signal(s, h)
        return restore


__all__ = ["LoRATrainer", "TrainingHistory", "check_writable", "resolve_chat_template"]
