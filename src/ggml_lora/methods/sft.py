"""Supervised fine-tuning: the cross-entropy of the completion (or every) token, as TRL's SFTTrainer.

Data come from data.py's pipeline (text, prompt/completion, chat; files, datasets, streams); rows are
shuffled per epoch by the loop's default and collated ``batch_size`` at a time; the step is the native
forward + backward over the micro-batches, clipping and AdamW (training.TrainingContext.step).
"""

from __future__ import annotations

import math

import numpy as np

from ..data import collate, load_splits, make_rows
from ..forward import loss_sum
from .base import StepOutput, TrainingMethod


class SFT(TrainingMethod):
    name = "sft"

    def eval_rows(self, data):
        """``data`` as Samples already, or a source; rows unpacked, one per sample."""
        from ..data import Sample

        samples = data if data and isinstance(data, list) and isinstance(data[0], Sample) else self.load(data)[0]
        cfg = self.config
        return make_rows(samples, max_seq_length=cfg.max_seq_length, packing=False, seed=cfg.seed)

    def load(self, dataset, valid=None):
        cfg = self.config
        return load_splits(dataset, self.model, valid=valid, valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                           max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                           train_on_prompt=cfg.train_on_prompt, chat_template=self.trainer.chat_template())

    def rows(self, samples, packing: bool):
        cfg = self.config
        return make_rows(samples, max_seq_length=cfg.max_seq_length, packing=packing, seed=cfg.seed)

    def micro_batches(self, chosen, first_key: int = 0):
        """(the rows collated batch_size at a time, their tokens without padding). Without dropout, a
        micro-batch's rows go end to end in one sequence (collate's pack: no padding, the same
        gradients); with it, each row's dropout masks are keyed by its place in the step (first_key + i),
        not by its micro-batch or padding, so each row keeps a sequence of its own."""
        size = self.config.batch_size
        pack = self.lora_config.dropout == 0
        keys = None if pack else np.arange(first_key, first_key + len(chosen))
        return ([collate(chosen[i:i + size], self.model, seq_keys=None if pack else keys[i:i + size], pack=pack)
                 for i in range(0, len(chosen), size)],
                sum(len(r.tokens) for r in chosen))

    def _run_step(self, batches, learning_rate: float, step: int, **kw):
        return self.ctx.step(batches, learning_rate, step, **kw)

    def step(self, batches, learning_rate: float, step: int, n_step_tokens: int | None = None) -> StepOutput:
        """Forward + backward over the micro-batches, then clip and update unless anything is not finite.
        Data parallel: ``n_step_tokens`` supervised tokens in every process's micro-batches together."""
        cfg, trainer = self.config, self.trainer
        kw = {} if trainer.comm.size == 1 else {"n_step_tokens": n_step_tokens, "reduce": trainer.reduce}
        res = self._run_step(batches, learning_rate, step, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                             max_grad_norm=cfg.max_grad_norm or None, dropout_seed=cfg.seed * 1_000_003 + step, **kw)
        return StepOutput(res.loss, res.n_tokens, res.grad_norm, not res.skipped)

    def evaluate_rows(self, rows, batch_size: int, use_adapter: bool = True, f16_weights: bool = False) -> dict:
        trainer = self.trainer
        comm = trainer.comm
        total, count = 0.0, 0
        adapter = self.adapter if use_adapter else None
        starts = range(0, len(rows), batch_size)[comm.rank::comm.size]   # ranks share the batches
        for i in starts:
            batch = collate(rows[i:i + batch_size], self.model, pack=True)
            total += loss_sum(self.model, adapter, batch, f16_weights=f16_weights)
            count += batch.n_loss
            if trainer.stopping:
                break
        if comm.size > 1:
            sums = np.array([total, count], dtype=np.float64)
            comm.allreduce(sums)
            total, count = float(sums[0]), int(sums[1])
        loss = total / count if count else math.nan
        return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < 700 else math.inf, "val_tokens": count}

    def load_stream(self, dataset, valid):
        """(a function that starts the training stream of rows, validation samples, reports), streaming=True."""
        from ..data import load_dataset, own_validation, stream_rows, stream_samples

        cfg = self.config
        kw = dict(max_seq_length=cfg.max_seq_length, truncation=cfg.truncation, train_on_prompt=cfg.train_on_prompt,
                  chat_template=self.trainer.chat_template())
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
