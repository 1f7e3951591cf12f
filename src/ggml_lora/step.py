"""One optimizer step at a time: the native training context and the Python side of a step.

Loss = next-token cross-entropy over the supervised tokens only, normalised by the number of
supervised tokens in the whole optimizer step, so k accumulated micro-batches give the same update as
one batch k times larger. Only the rows that carry loss reach the LM head (rows are selected before
the loss, never masked with zero labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._handles import Batch, NativeHandle, float_buffer
from ._native import check, ffi, lib
from .adapter import Adapter
from .config import LoRAConfig
from .errors import InvalidArgumentError
from .model import BaseModel

OPTIMIZERS = {"adamw": lib.GLORA_OPTIMIZER_ADAMW, "sgd": lib.GLORA_OPTIMIZER_SGD}    # enum glora_optimizer
MEMORY_FIELDS = ("weights", "transposed", "f16_weights", "adapter", "optimizer", "checkpoints", "compute")


@dataclass(frozen=True)
class StepResult:
    loss: float            # mean cross-entropy over the step's supervised tokens (before the update)
    n_tokens: int          # supervised tokens in the step
    grad_norm: float       # global L2 norm of the gradient, before clipping
    clip_scale: float      # factor applied to the gradient (1.0 when not clipped, 0.0 when skipped)
    skipped: bool = False  # the loss or gradient norm was not finite: no update, the gradient was dropped


class TrainingContext(NativeHandle):
    """Gradient accumulators and optimizer moments for one adapter, on the model's device."""

    def __init__(self, adapter: Adapter, optimizer: str = "adamw", dropout: float | None = None,
                 gradient_checkpointing: bool = False, f16_weights: bool = False,
                 keep_transposed_weights: bool = False):
        """``gradient_checkpointing`` keeps only each block's input and recomputes the block in the
        backward: activation memory of one block instead of all, for about one more forward pass of
        compute. The gradients are the same either way (same dropout masks for the same seed).

        ``f16_weights`` runs the training forward through F16 copies of the quantized weights, made
        once per model (2 bytes per weight): faster on CPU, at the cost of the memory and of llama.cpp's
        exact arithmetic in the training loss (validation and evaluate() use the stored weights unless
        evaluate is given f16_weights=True).

        ``keep_transposed_weights`` keeps transposed F16 copies of every frozen matrix for the backward
        products (made once per model, 2 bytes per weight). By default each step makes them in its
        compute buffer where it needs them, so the frozen model costs only its stored size; the gradients
        are bit-identical either way."""
        if optimizer not in OPTIMIZERS:
            raise InvalidArgumentError(f"optimizer={optimizer!r}: must be one of {', '.join(OPTIMIZERS)}")
        if dropout is None:
            dropout = adapter.config.dropout if adapter.config is not None else 0.0
        if not 0.0 <= dropout < 1.0:
            raise InvalidArgumentError(f"dropout={dropout!r}: must be in [0, 1)")
        params = ffi.new("glora_trainer_params *")
        params.optimizer = OPTIMIZERS[optimizer]
        params.dropout = float(dropout)
        if not isinstance(gradient_checkpointing, bool):
            raise InvalidArgumentError(f"gradient_checkpointing={gradient_checkpointing!r}: must be True or False")
        params.gradient_checkpointing = int(gradient_checkpointing)
        if not isinstance(f16_weights, bool):
            raise InvalidArgumentError(f"f16_weights={f16_weights!r}: must be True or False")
        params.f16_weights = int(f16_weights)
        if not isinstance(keep_transposed_weights, bool):
            raise InvalidArgumentError(f"keep_transposed_weights={keep_transposed_weights!r}: must be True or False")
        params.keep_transposed = int(keep_transposed_weights)
        out = ffi.new("glora_trainer **")
        # the first context of a model makes its shared working copies on the model's scheduler
        with adapter._using() as adapter_ptr:
            check(lib.glora_trainer_new(adapter_ptr, params, out))
            self._set_handle(out[0], lib.glora_trainer_free, parent=adapter)
        self.adapter = adapter
        self.optimizer = optimizer
        self.dropout = dropout
        self.gradient_checkpointing = gradient_checkpointing
        self.f16_weights = f16_weights
        self.keep_transposed_weights = keep_transposed_weights

    def measure(self, batch_size: int, seq_len: int, n_loss: int | None = None) -> dict[str, int]:
        """Bytes one micro-batch of ``batch_size`` x ``seq_len`` needs (see :func:`estimate_memory`)."""
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgumentError(f"{name}={v!r}: must be a positive integer")
        if seq_len > self.adapter.model.n_ctx:
            raise InvalidArgumentError(f"seq_len={seq_len} is longer than the model's n_ctx={self.adapter.model.n_ctx}")
        if n_loss is None:
            n_loss = batch_size * (seq_len - 1) or 1
        out = ffi.new("glora_memory *")
        with self._using() as ptr:
            check(lib.glora_trainer_measure(ptr, batch_size, seq_len, n_loss, out))
        return {f: int(getattr(out, f)) for f in MEMORY_FIELDS}

    def accumulate(self, batch: Batch, n_step_tokens: int, dropout_seed: int = 0) -> float:
        """Add the gradient of (sum of CE over ``batch``) / n_step_tokens; returns the CE sum."""
        if n_step_tokens <= 0:
            raise InvalidArgumentError(f"n_step_tokens={n_step_tokens}: must be positive")
        out = ffi.new("double *")
        with self._using() as ptr:
            check(lib.glora_trainer_accumulate(ptr, batch.c, 1.0 / n_step_tokens, dropout_seed & 0xFFFFFFFFFFFFFFFF,
                                               out))
        return out[0]

    def grad_norm(self) -> float:
        out = ffi.new("double *")
        with self._using() as ptr:
            check(lib.glora_trainer_grad_norm(ptr, out))
        return out[0]

    def zero_grad(self) -> None:
        with self._using() as ptr:
            check(lib.glora_trainer_zero_grad(ptr))

    def apply(self, learning_rate: float, step: int, *, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 0.0, grad_scale: float = 1.0) -> None:
        """One optimizer update from the accumulated gradient (times grad_scale); zeroes the gradient."""
        if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
            raise InvalidArgumentError(f"learning_rate={learning_rate!r}: must be positive and finite")
        s = ffi.new("glora_opt_step *")
        s.learning_rate = learning_rate
        s.beta1, s.beta2 = betas
        s.eps = eps
        s.weight_decay = weight_decay
        s.step = step
        s.grad_scale = grad_scale
        with self._using() as ptr:
            check(lib.glora_trainer_step(ptr, s))
            for name, (a_fixed, b_fixed) in self.adapter.frozen.items():
                a, b = self.adapter.get(name)
                r = a.shape[0] - a_fixed.shape[0]
                a[r:], b[:, r:] = a_fixed, b_fixed
                self.adapter.set(name, lora_a=a, lora_b=b)

    def _drop_frozen_grads(self) -> None:
        """Zero the gradient of frozen halves (PiSSA), so clipping and AdamW see only trainable values."""
        for name, (a_fixed, _) in self.adapter.frozen.items():
            r = self.adapter.ranks[name] - a_fixed.shape[0]
            ga, gb = self._state(0, name, 0), self._state(0, name, 1)
            ga[r:], gb[:, r:] = 0.0, 0.0
            self._state(0, name, 0, ga)
            self._state(0, name, 1, gb)

    def accumulate_all(self, micro_batches: Sequence[Batch], dropout_seed: int,
                       n_step_tokens: int | None = None) -> tuple[float, int]:
        """(CE sum, supervised tokens) of one optimizer step's micro-batches, their gradient of the mean
        CE accumulated. ``n_step_tokens``: the supervised tokens of the whole step when these micro-batches
        are only a part of it (data parallelism: the other processes hold the rest; this share may then be
        empty). Callers hold ``_lock`` across this and the update."""
        if not micro_batches and n_step_tokens is None:
            raise InvalidArgumentError("step: no micro-batches")
        n_tokens = sum(b.n_loss for b in micro_batches) if n_step_tokens is None else n_step_tokens
        if n_tokens <= 0:
            raise InvalidArgumentError("step: the micro-batches have no supervised tokens")
        loss_sum = 0.0
        for i, b in enumerate(micro_batches):
            # batches with seq_keys key each row's masks by its own key; the others by micro-batch
            seed = dropout_seed if b.seq_keys is not None else dropout_seed * 1_000_003 + i
            loss_sum += self.accumulate(b, n_tokens, dropout_seed=seed)
        return loss_sum, n_tokens

    def step(self, micro_batches: Sequence[Batch], learning_rate: float, step: int, *,
             betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
             max_grad_norm: float | None = None, dropout_seed: int = 0, n_step_tokens: int | None = None,
             reduce: Callable[[float], float] | None = None) -> StepResult:
        """Forward + backward over every micro-batch, then clip and update: one optimizer step.

        The one step algorithm (the trainer uses it too). The whole step holds the model's lock, so
        another thread's step on the same model cannot interleave with this one's accumulation. When
        the loss or the gradient norm is not finite, nothing is updated, the gradient is dropped and
        the result says ``skipped=True``. Data parallelism: ``n_step_tokens`` counts the supervised
        tokens of every process's micro-batches, and ``reduce(loss_sum)`` (after the accumulation) sums
        the gradients and the loss over the processes and returns the step's loss sum."""
        with self._lock:
            loss_sum, n_tokens = self.accumulate_all(micro_batches, dropout_seed, n_step_tokens)
            if reduce is not None:
                loss_sum = reduce(loss_sum)
            return self.finish_step(loss_sum / n_tokens, n_tokens, learning_rate, step, betas=betas, eps=eps,
                                    weight_decay=weight_decay, max_grad_norm=max_grad_norm)

    def finish_step(self, loss: float, n_tokens: int, learning_rate: float, step: int, *,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                    max_grad_norm: float | None = None) -> StepResult:
        """The second half of a step, after the gradient of ``loss`` has been accumulated (by
        :meth:`step`, or by another objective's own passes): skip it when the loss or the gradient norm
        is not finite, else clip and update. Callers hold ``_lock`` since the accumulation."""
        self._drop_frozen_grads()
        norm = self.grad_norm()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.zero_grad()
            return StepResult(loss, n_tokens, norm, 0.0, skipped=True)
        clip = 1.0
        if max_grad_norm is not None and max_grad_norm > 0 and norm > max_grad_norm:
            clip = max_grad_norm / (norm + 1e-6)
        self.apply(learning_rate, step, betas=betas, eps=eps, weight_decay=weight_decay, grad_scale=clip)
        return StepResult(loss, n_tokens, norm, clip)

    # ---- state --------------------------------------------------------------------------------------

    def _state(self, kind: int, name: str, which: int, value: np.ndarray | None = None) -> np.ndarray | None:
        i = self.adapter.target_index(name)
        shape = self.adapter.pair_shape(name, which)
        if value is None:
            arr = np.empty(shape, dtype=np.float32)
            with self._using() as ptr:
                check(lib.glora_trainer_state(ptr, i, which, kind, float_buffer(arr), arr.size, 0))
            return arr
        arr = np.ascontiguousarray(value, dtype=np.float32)
        if arr.shape != shape:
            raise InvalidArgumentError(f"{name}: state shape {arr.shape}, expected {shape}")
        with self._using() as ptr:
            check(lib.glora_trainer_state(ptr, i, which, kind, float_buffer(arr), arr.size, 1))
        return None

    def gradients(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The accumulated gradient of every (lora_a, lora_b)."""
        return {t: (self._state(0, t, 0), self._state(0, t, 1)) for t in self.adapter.targets}

    def allreduce_gradients(self, allreduce: Callable[[np.ndarray], None]) -> int:
        """Replace the accumulated gradient by ``allreduce`` of it (one float32 buffer of every lora_a and
        lora_b, summed in place across processes); returns the bytes reduced."""
        grads = self.gradients()
        flat = np.concatenate([g.ravel() for pair in grads.values() for g in pair])
        allreduce(flat)
        at = 0
        for name, pair in grads.items():
            for which, g in enumerate(pair):
                self._state(0, name, which, flat[at:at + g.size].reshape(g.shape))
                at += g.size
        return flat.nbytes

    def moments(self) -> dict[str, tuple[np.ndarray, ...]]:
        """AdamW moments (m_a, v_a, m_b, v_b) of every target."""
        return {t: (self._state(1, t, 0), self._state(2, t, 0), self._state(1, t, 1), self._state(2, t, 1))
                for t in self.adapter.targets}

    def set_moments(self, moments: dict[str, tuple[np.ndarray, ...]]) -> None:
        for t, (ma, va, mb, vb) in moments.items():
            self._state(1, t, 0, ma)
            self._state(2, t, 0, va)
            self._state(1, t, 1, mb)
            self._state(2, t, 1, vb)


def estimate_memory(model: BaseModel, lora: LoRAConfig | Adapter, batch_size: int, seq_len: int,
                    gradient_checkpointing: bool = False, optimizer: str = "adamw",
                    f16_weights: bool = False, keep_transposed_weights: bool = False) -> dict[str, int]:
    """Bytes a training step of ``batch_size`` x ``seq_len`` tokens needs, before any step runs.

    Every number comes from the real tensors and from ggml's allocation plan of the very graphs a step
    builds (nothing is computed): ``weights`` (the base model as stored), ``transposed`` (persistent
    transposed copies for the backward, with keep_transposed_weights; without, the transient ones are part
    of ``compute``), ``f16_weights`` (F16 copies for the forward, when asked for), ``adapter`` (A and B), ``optimizer`` (gradients and AdamW moments),
    ``checkpoints`` (block inputs with gradient checkpointing), ``compute`` (the largest compute buffer,
    holding activations, logits and loss) and ``total``. Host-side overhead of the Python process and
    of the batch itself are not included.
    """
    if isinstance(lora, Adapter):
        if lora.model is not model:
            raise InvalidArgumentError("the adapter was made for another BaseModel")
        with TrainingContext(lora, optimizer, gradient_checkpointing=gradient_checkpointing,
                             f16_weights=f16_weights, keep_transposed_weights=keep_transposed_weights) as ctx:
            out = ctx.measure(batch_size, seq_len)
    elif isinstance(lora, LoRAConfig):
        with Adapter.init(model, lora) as adapter, \
                TrainingContext(adapter, optimizer, gradient_checkpointing=gradient_checkpointing,
                                f16_weights=f16_weights, keep_transposed_weights=keep_transposed_weights) as ctx:
            out = ctx.measure(batch_size, seq_len)
    else:
        raise InvalidArgumentError(f"lora: expected a LoRAConfig or an Adapter, got {type(lora).__name__}")
    out["total"] = sum(out[f] for f in MEMORY_FIELDS)
    return out
