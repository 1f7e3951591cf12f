"""The forward pass without a gradient: the cross-entropy of a batch's loss rows under the base model
with or without an adapter (llama.cpp's arithmetic through the stored weights by default).

BaseModel.evaluate, evaluation during training and the preference and GRPO passes all run through here.
Only the native library is imported: the model and adapter are taken as they come (no import cycle).
"""

from __future__ import annotations

import numpy as np

from ._handles import Batch, float_buffer
from ._native import check, ffi, lib
from .errors import InvalidArgumentError

# Adapter and BaseModel in annotations: model.py imports this module, so the names are not imported here


def loss_batch(model: BaseModel, tokens, loss_mask=None) -> Batch:
    """A Batch whose loss rows are the supervised tokens: row p-1 predicts token p where mask[p] is true.

    ``loss_mask`` has the shape of ``tokens`` ((T,) or (B, T)); None supervises every token but the
    first of each sequence. Position 0 can never be a target (nothing predicts it).
    """
    arr, single = model.as_tokens(tokens)
    n_seq, n_tok = arr.shape
    if loss_mask is None:
        mask = np.ones_like(arr, dtype=bool)
    else:
        mask = np.asarray(loss_mask, dtype=bool)
        if single and mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != arr.shape:
            raise InvalidArgumentError(f"loss_mask: shape {mask.shape} does not match tokens {arr.shape}")
    mask = mask.copy()
    mask[:, 0] = False
    seq, pos = np.nonzero(mask)
    if len(seq) == 0:
        raise InvalidArgumentError("loss_mask: no supervised tokens (loss positions are empty)")
    rows = seq * n_tok + pos - 1
    labels = arr[seq, pos]
    return Batch(arr, loss_rows=rows, labels=labels)


def evaluate(model: BaseModel, adapter: Adapter | None, tokens, loss_mask=None, scale: float = 1.0,
             f16_weights: bool = False) -> tuple[float, int]:
    """(mean next-token cross-entropy, supervised token count) of ``tokens``; no dropout.
    ``f16_weights`` as in :func:`loss_sum`."""
    batch = loss_batch(model, tokens, loss_mask)
    return loss_sum(model, adapter, batch, scale, f16_weights) / batch.n_loss, batch.n_loss


def _check_forward(model: BaseModel, adapter: Adapter | None, f16_weights) -> None:
    """The arguments loss_sum and row_losses share, checked before native code sees them."""
    if adapter is not None and adapter.model is not model:
        raise InvalidArgumentError("the adapter was made for another BaseModel")
    if not isinstance(f16_weights, bool):
        raise InvalidArgumentError(f"f16_weights={f16_weights!r}: must be True or False")


def loss_sum(model: BaseModel, adapter: Adapter | None, batch: Batch, scale: float = 1.0,
             f16_weights: bool = False) -> float:
    """Sum of next-token cross-entropy over ``batch``'s loss rows; no dropout.

    By default the forward multiplies by the weights as stored, llama.cpp's arithmetic: the loss is the
    one llama.cpp gives. ``f16_weights=True`` multiplies by F16 copies of the quantized weights instead
    (made on first use and kept with the model, 2 bytes per weight, the copies training with
    ``f16_weights`` uses): faster on CPU, and the loss then differs from llama.cpp's by rounding."""
    _check_forward(model, adapter, f16_weights)
    out = ffi.new("double *")
    with model._using() as model_ptr:
        handle = adapter._handle() if adapter is not None else ffi.NULL
        check(lib.glora_loss(model_ptr, handle, float(scale), int(f16_weights), batch.c, out))
    return out[0]


def row_losses(model: BaseModel, adapter: Adapter | None, batch: Batch, scale: float = 1.0,
               f16_weights: bool = False) -> np.ndarray:
    """The next-token cross-entropy of each of ``batch``'s loss rows (float32, in loss-row order), the same
    forward as :func:`loss_sum`; minus their sum over a sequence's rows is its log-probability."""
    _check_forward(model, adapter, f16_weights)
    out = np.empty(batch.n_loss, dtype=np.float32)
    with model._using() as model_ptr:
        handle = adapter._handle() if adapter is not None else ffi.NULL
        check(lib.glora_row_losses(model_ptr, handle, float(scale), int(f16_weights), batch.c, float_buffer(out)))
    return out


__all__ = ["evaluate", "loss_batch", "loss_sum", "row_losses"]
